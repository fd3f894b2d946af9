// A tiny headless-Chromium driver over the DevTools protocol on a pipe (--remote-debugging-pipe):
// no npm packages, no debugging port. It reads one JSON command per line on stdin and answers
// each with one JSON line on stdout, so a Rust test can drive a real browser step by step:
//
//   {"cmd":"goto","url":"https://127.0.0.1:8443/"}         -> {"ok":true}
//   {"cmd":"eval","expr":"document.title"}                  -> {"ok":true,"value":"…"}
//   {"cmd":"wait","expr":"…truthy when done…","timeout":5000} -> {"ok":true,"value":…} or ok:false
//   {"cmd":"screenshot","path":"docs/demo.png","height":460} -> {"ok":true}
//   {"cmd":"open","url":"http://127.0.0.1:8080/"}           -> {"ok":true,"value":1} (a new tab, now current)
//   {"cmd":"tab","id":0}                                    -> {"ok":true} (commands go to tab 0)
//   {"cmd":"close","id":1}                                  -> {"ok":true} (closes it as a user would)
//   {"cmd":"quit"}
//
// Commands act on the current tab: the first one (id 0) until `open` or `tab` picks another.
//
// Chromium runs with a fresh profile and every background feature off, and is killed when this
// script ends for any reason (stdin closed included).
//
// Usage: node tests/browser/cdp.mjs [chromium path, default /usr/bin/chromium]

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const chromium = process.argv[2] || "/usr/bin/chromium";
const profile = mkdtempSync(join(tmpdir(), "herald-chromium-"));
const flags = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--no-default-browser-check",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-extensions",
  "--disable-default-apps",
  "--disable-breakpad",
  "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
  "--metrics-recording-only",
  "--password-store=basic",
  "--use-mock-keychain",
  "--mute-audio",
  "--hide-scrollbars",
  "--ignore-certificate-errors",
  "--window-size=1100,760",
  `--user-data-dir=${profile}`,
  "--remote-debugging-pipe",
  "about:blank",
];
const browser = spawn(chromium, flags, { stdio: ["ignore", "ignore", "pipe", "pipe", "pipe"] });
let stderr = "";
browser.stderr.on("data", (d) => {
  stderr = (stderr + d).slice(-4000);
});

let cleaned = false;
function cleanup() {
  if (cleaned) return;
  cleaned = true;
  try {
    browser.kill("SIGKILL");
  } catch {}
  try {
    rmSync(profile, { recursive: true, force: true });
  } catch {}
}
process.on("exit", cleanup);
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(1));

// Stop chromium and wait for it to go before deleting its profile (it writes until it exits).
async function finish(code) {
  cleaned = true;
  const gone = new Promise((r) => (browser.exitCode !== null ? r() : browser.once("exit", r)));
  try {
    browser.kill("SIGKILL");
  } catch {}
  await Promise.race([gone, new Promise((r) => setTimeout(r, 3000))]);
  try {
    rmSync(profile, { recursive: true, force: true });
  } catch {}
  process.exit(code);
}
browser.on("exit", (code) => {
  if (!cleaned) {
    reply({ ok: false, error: `chromium exited (${code}): ${stderr}` });
    process.exit(1);
  }
});

// --- the protocol: NUL-terminated JSON messages on fds 3 (to chromium) and 4 (from it) ---
const toBrowser = browser.stdio[3];
const fromBrowser = browser.stdio[4];
let nextId = 1;
const pending = new Map();
const listeners = new Set();
let inbox = "";
fromBrowser.on("data", (chunk) => {
  inbox += chunk.toString("utf8");
  let nul;
  while ((nul = inbox.indexOf("\0")) >= 0) {
    const msg = JSON.parse(inbox.slice(0, nul));
    inbox = inbox.slice(nul + 1);
    if (msg.id && pending.has(msg.id)) {
      const { resolve, reject } = pending.get(msg.id);
      pending.delete(msg.id);
      msg.error ? reject(new Error(msg.error.message)) : resolve(msg.result);
    } else {
      for (const l of [...listeners]) l(msg);
    }
  }
});

function send(method, params = {}, sessionId) {
  const id = nextId++;
  const msg = { id, method, params };
  if (sessionId) msg.sessionId = sessionId;
  toBrowser.write(JSON.stringify(msg) + "\0");
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
}

function once(method, sessionId, timeout) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      listeners.delete(l);
      reject(new Error(`no ${method} within ${timeout} ms`));
    }, timeout);
    const l = (msg) => {
      if (msg.method === method && msg.sessionId === sessionId) {
        clearTimeout(timer);
        listeners.delete(l);
        resolve(msg.params);
      }
    };
    listeners.add(l);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// --- tabs, each attached in flat mode; commands go to the current one ---
const tabs = new Map(); // id -> { id, targetId, sessionId, consoleLines }
let nextTab = 0;
let tab;
const page = (method, params) => send(method, params, tab.sessionId);

async function newTab() {
  const { targetId } = await send("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await send("Target.attachToTarget", { targetId, flatten: true });
  const t = { id: nextTab++, targetId, sessionId, consoleLines: [] };
  tabs.set(t.id, t);
  await send("Page.enable", {}, sessionId);
  await send("Runtime.enable", {}, sessionId);
  await send("Emulation.setDeviceMetricsOverride", { width: 1100, height: 760, deviceScaleFactor: 1, mobile: false }, sessionId);
  return t;
}

listeners.add((msg) => {
  const t = [...tabs.values()].find((x) => x.sessionId === msg.sessionId);
  if (!t) return;
  if (msg.method === "Runtime.consoleAPICalled") {
    t.consoleLines.push(`${msg.params.type}: ${msg.params.args.map((a) => a.value ?? a.description).join(" ")}`);
  } else if (msg.method === "Runtime.exceptionThrown") {
    t.consoleLines.push(`exception: ${msg.params.exceptionDetails.exception?.description ?? msg.params.exceptionDetails.text}`);
  }
  if (t.consoleLines.length > 50) t.consoleLines.shift();
});
tab = await newTab();

async function evaluate(expr) {
  const r = await page("Runtime.evaluate", { expression: expr, returnByValue: true, awaitPromise: true });
  if (r.exceptionDetails) {
    throw new Error(r.exceptionDetails.exception?.description ?? r.exceptionDetails.text);
  }
  return r.result.value;
}

const commands = {
  async goto({ url, timeout = 10000 }) {
    const loaded = once("Page.loadEventFired", tab.sessionId, timeout);
    const r = await page("Page.navigate", { url });
    if (r.errorText) throw new Error(`navigation failed: ${r.errorText}`);
    await loaded;
  },
  eval: ({ expr }) => evaluate(expr),
  async wait({ expr, timeout = 5000 }) {
    const deadline = Date.now() + timeout;
    let last;
    for (;;) {
      try {
        last = await evaluate(expr);
        if (last) return last;
      } catch (e) {
        last = String(e);
      }
      if (Date.now() > deadline) throw new Error(`not true within ${timeout} ms: ${expr} (last: ${JSON.stringify(last)})`);
      await sleep(50);
    }
  },
  async screenshot({ path, height }) {
    const params = { format: "png" };
    if (height) params.clip = { x: 0, y: 0, width: 1100, height, scale: 1 };
    const { data } = await page("Page.captureScreenshot", params);
    writeFileSync(path, Buffer.from(data, "base64"));
  },
  console: () => tab.consoleLines.slice(),
  async open({ url, timeout }) {
    tab = await newTab();
    await commands.goto({ url, timeout });
    return tab.id;
  },
  tab({ id }) {
    if (!tabs.has(id)) throw new Error(`no tab ${id}`);
    tab = tabs.get(id);
  },
  async close({ id }) {
    const t = tabs.get(id);
    if (!t) throw new Error(`no tab ${id}`);
    const gone = once("Target.detachedFromTarget", undefined, 10000);
    await send("Target.closeTarget", { targetId: t.targetId });
    await gone;
    tabs.delete(id);
    if (tab === t) tab = tabs.values().next().value;
  },
  quit: () => finish(0),
};

function reply(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

reply({ ok: true, ready: true });
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let cmd;
  try {
    cmd = JSON.parse(line);
    const fn = commands[cmd.cmd];
    if (!fn) throw new Error(`unknown command ${cmd.cmd}`);
    reply({ ok: true, value: (await fn(cmd)) ?? null });
  } catch (e) {
    reply({ ok: false, error: String(e && e.message ? e.message : e), console: tab ? tab.consoleLines.slice(-10) : [] });
  }
}
// stdin closed: the test is gone.
await finish(0);
