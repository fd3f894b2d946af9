// Small stand-ins for the browser APIs client.js uses, so its stream, refusal, session and tab
// logic runs in Node: EventSource, fetch, Web Locks (navigator.locks), BroadcastChannel, and the
// window/document lifecycle events. Several `Herald`s in one process act as several tabs of one
// origin: they share the lock manager and the channels, as tabs do.

/** An EventSource the test drives: `open()`, `emit(name, data, id)`, `fail(closed)`. */
export class FakeEventSource {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSED = 2;
  static all = [];

  constructor(url, options) {
    this.url = url;
    this.options = options;
    this.readyState = FakeEventSource.CONNECTING;
    this.lastEventId = "";
    this.listeners = new Map();
    this.onopen = null;
    this.onerror = null;
    FakeEventSource.all.push(this);
  }

  addEventListener(name, fn) {
    if (!this.listeners.has(name)) this.listeners.set(name, []);
    this.listeners.get(name).push(fn);
  }

  close() {
    this.readyState = FakeEventSource.CLOSED;
  }

  get closed() {
    return this.readyState === FakeEventSource.CLOSED;
  }

  /** The query parameters of the stream's URL. */
  get params() {
    return new URL(this.url, "http://page.test").searchParams;
  }

  open() {
    this.readyState = FakeEventSource.OPEN;
    if (this.onopen) this.onopen({});
  }

  /** One SSE event; `id` becomes the last event id, as the `id:` field does. */
  emit(name, data, id) {
    if (id !== undefined) this.lastEventId = id;
    const e = { type: name, data: typeof data === "string" ? data : JSON.stringify(data), lastEventId: this.lastEventId };
    for (const fn of this.listeners.get(name) || []) fn(e);
  }

  /** A connection error: the browser retries (`closed` false) or gives up (an HTTP error). */
  fail(closed) {
    this.readyState = closed ? FakeEventSource.CLOSED : FakeEventSource.CONNECTING;
    const e = { type: "error" };
    if (this.onerror) this.onerror(e);
    for (const fn of this.listeners.get("error") || []) fn(e);
  }

  static live() {
    return FakeEventSource.all.filter((es) => !es.closed);
  }
}

/** `fetch` answered by `handler(url, init)`; every call is kept in `calls`. */
export function fakeFetch(handler) {
  const calls = [];
  const fn = async (url, init = {}) => {
    const call = { url: String(url), method: init.method || "GET", headers: init.headers || {}, init };
    if (init.body) call.body = JSON.parse(init.body);
    calls.push(call);
    return handler(call);
  };
  fn.calls = calls;
  return fn;
}

export function json(status, body, headers = {}) {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json", ...headers } });
}

const abortError = () => Object.assign(new Error("aborted"), { name: "AbortError" });

/** Web Locks, exclusive mode: granted one at a time per name, in request order, asynchronously. */
export class FakeLocks {
  constructor() {
    this.held = new Map();
    this.queues = new Map();
  }

  request(name, options, callback) {
    if (typeof options === "function") [callback, options] = [options, {}];
    return new Promise((resolve, reject) => {
      const { signal } = options;
      if (signal && signal.aborted) return reject(abortError());
      const req = { callback, resolve, reject };
      if (!this.queues.has(name)) this.queues.set(name, []);
      const queue = this.queues.get(name);
      queue.push(req);
      if (signal) {
        signal.addEventListener("abort", () => {
          const i = queue.indexOf(req);
          if (i >= 0) {
            queue.splice(i, 1);
            reject(abortError());
          }
        });
      }
      this.pump(name);
    });
  }

  pump(name) {
    const queue = this.queues.get(name);
    if (this.held.has(name) || !queue || queue.length === 0) return;
    const req = queue.shift();
    this.held.set(name, req);
    setImmediate(async () => {
      try {
        req.resolve(await req.callback({ name, mode: "exclusive" }));
      } catch (e) {
        req.reject(e);
      }
      this.held.delete(name);
      this.pump(name);
    });
  }

  isHeld(name) {
    return this.held.has(name);
  }
}

/** A BroadcastChannel class whose instances of one name hear each other (not themselves). */
export function fakeBroadcastChannel() {
  const byName = new Map();
  return class FakeBroadcastChannel {
    constructor(name) {
      this.name = name;
      this.onmessage = null;
      if (!byName.has(name)) byName.set(name, new Set());
      byName.get(name).add(this);
    }

    postMessage(message) {
      if (!byName.get(this.name).has(this)) throw new Error("InvalidStateError: channel closed");
      const data = structuredClone(message);
      for (const other of byName.get(this.name)) {
        if (other === this) continue;
        setImmediate(() => byName.get(other.name).has(other) && other.onmessage && other.onmessage({ data }));
      }
    }

    close() {
      byName.get(this.name).delete(this);
    }
  };
}

/**
 * Install the fakes as the page's globals. `locks: false` or `channel: false` leave that API
 * out (an older browser). Returns what the test drives.
 */
export function install({ locks = true, channel = true, handler = () => json(404, { error: "not-found" }) } = {}) {
  FakeEventSource.all.length = 0;
  const window = new EventTarget();
  const document = new EventTarget();
  document.visibilityState = "visible";
  const lockManager = new FakeLocks();
  const fetch = fakeFetch((call) => env.handler(call));
  const env = { window, document, locks: lockManager, fetch, handler };
  Object.assign(globalThis, {
    EventSource: FakeEventSource,
    fetch,
    document,
    addEventListener: window.addEventListener.bind(window),
    removeEventListener: window.removeEventListener.bind(window),
  });
  Object.defineProperty(globalThis, "navigator", {
    value: locks ? { locks: lockManager } : {},
    configurable: true,
    writable: true,
  });
  Object.defineProperty(globalThis, "BroadcastChannel", {
    value: channel ? fakeBroadcastChannel() : undefined,
    configurable: true,
    writable: true,
  });
  return env;
}

/** Let every queued lock grant, channel message and fetch run (with real timers). */
export async function settle(rounds = 30) {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}

/**
 * herald's multiplexed stream as a test writes it: per-topic positions (`<epoch>-<seq>`) and the
 * `~`-joined id listing every topic sent so far, as herald's `sse::mux` makes them.
 */
export class MuxWriter {
  constructor(es, positions = {}) {
    this.es = es;
    this.positions = new Map(Object.entries(positions));
  }

  id() {
    return [...this.positions.values()].join("~");
  }

  /** Send `type` for `topic` at `epoch`-`seq` (base 36). */
  send(type, topic, data, epoch, seq, extra = {}) {
    this.positions.set(topic, `${epoch}-${seq.toString(36)}`);
    const env = { type, topic, timestamp: "2026-12-02T09:00:00Z", ...extra, data };
    this.es.emit(type, env, this.id());
  }

  hello(paths, control = "/_herald/stream/tok") {
    this.es.emit("hello", {
      type: "hello",
      token: "tok",
      control,
      watches: paths.map((path) => ({ path, topic: path })),
      max_watches: 64,
      retry: 2000,
    });
  }
}
