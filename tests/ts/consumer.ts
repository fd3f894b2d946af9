// A web app using `@herald/client` as an npm package, type-checked by tests/client_js.rs with
// `tsc --strict`. Every `@ts-expect-error` line must fail to type-check (tsc reports an unused
// directive otherwise), so the declarations are held to being neither wrong nor too loose.
import herald, { Herald, applyChange, applyMergePatch, applyPatch, equal, watch } from "@herald/client";
import type { HeraldError, HeraldOptions, Json, Status, WatchCallback, WatchHandle, WatchInfo } from "@herald/client";

interface Build {
  id: number;
  status: "running" | "passed" | "failed";
  steps: { name: string; status: string }[];
}

function render(build: Build, hidden: boolean): string {
  return hidden ? "" : `${build.id}: ${build.status} (${build.steps.length} steps)`;
}

// Options: every one, with an async token and refresh.
let token = "t1";
const options: HeraldOptions = {
  mux: "/_herald/stream",
  base: "https://live.example.com",
  withCredentials: true,
  share: "user-42",
  accessToken: async () => token,
  tokenParam: "access_token",
  refresh: async () => {
    token = "t2";
    return token;
  },
};
const client = new Herald(options);
new Herald({ mux: null, accessToken: "static", share: false });
new Herald();

// A typed watch: the state is the app's type, possibly undefined; info says why it ran.
const handle: WatchHandle<Build> = client.watch<Build>(
  "/api/builds/42",
  (build, info: WatchInfo) => {
    if (build) render(build, info.hidden);
    const kind: "snapshot" | "patch" | "upstream-error" | "refused" | "error" = info.type;
    const position: string | null = info.id;
    if (info.error) console.warn(info.error.error, info.error.message, kind, position, info.topic, info.events);
  },
  { from: { id: "1k3f9a-2f", state: { id: 42, status: "running", steps: [] } } },
);
const current: Build | undefined = handle.state;
handle.close();
console.log(current?.status, handle.path, handle.error);

// Without a type argument the state is JSON.
watch("/api/builds/1", (state: Json | undefined) => console.log(state));
herald.watch("/api/builds/2");

// fetchAndWatch resolves to a handle.
async function start(): Promise<void> {
  const h = await client.fetchAndWatch<Build>("/api/builds/7", (b) => b && render(b, false));
  h.close();
}
void start();

// Status and errors: unsubscribe functions; errors narrowed by type.
const offStatus: () => void = client.onStatus((s: Status) => console.log(s === "stopped" || s === "live"));
const offError = client.onError((e: HeraldError) => {
  switch (e.type) {
    case "refused":
      console.warn(`refused ${e.path}: ${e.status} ${e.error} ${e.message}`);
      break;
    case "auth-expired":
      console.warn(e.expired_at, e.status);
      break;
    case "refresh-failed":
    case "error":
      console.warn(e.message);
  }
});
offStatus();
offError();
client.reconnect();
client.suspend();
client.resume();
console.log(client.status, client.stats.opens, client.stats.events, client.stats.resyncs, client.conns.size);
client.close();

// The patch functions.
const doc: Json = applyPatch({ a: 1 }, [{ op: "replace", path: "/a", value: 2 }, { op: "move", from: "/a", path: "/b" }]);
const merged: Json = applyMergePatch(doc, { b: null });
console.log(applyChange(merged, [1], "merge-patch"), applyChange(merged, { c: 1 }), equal(doc, merged));

// Exact types, so that a declaration loosened to `any` fails too.
type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
const exact: [
  Equal<typeof handle.state, Build | undefined>,
  Equal<Parameters<WatchCallback<Build>>, [Build | undefined, WatchInfo]>,
  Equal<WatchInfo["id"], string | null>,
  Equal<WatchInfo["hidden"], boolean>,
  Equal<Status, "idle" | "connecting" | "live" | "reconnecting" | "stopped" | "closed">,
  Equal<ReturnType<typeof client.fetchAndWatch<Build>>, Promise<WatchHandle<Build>>>,
  Equal<Parameters<Parameters<typeof client.onError>[0]>[0], HeraldError>,
  Equal<HeraldError["type"], "refused" | "error" | "auth-expired" | "refresh-failed">,
  Equal<ReturnType<typeof applyChange>, Json>,
] = [true, true, true, true, true, true, true, true, true];
console.log(exact);

// Misuses the declarations must reject:
// @ts-expect-error: the state may be undefined until there is one
client.watch<Build>("/api/builds/1", (b) => render(b, false));
// @ts-expect-error: not a status
const wrong: Status = "open";
// @ts-expect-error: `from` needs a state
client.watch("/api/builds/1", () => {}, { from: { id: "1-1" } });
// @ts-expect-error: fetchAndWatch takes its state and position from the GET
void client.fetchAndWatch("/api/builds/1", () => {}, { from: { id: "1-1", state: {} } });
// @ts-expect-error: tokens are strings
new Herald({ accessToken: 42 });
// @ts-expect-error: an unknown option
new Herald({ retries: 3 });
// @ts-expect-error: a JSON Patch operation needs a known op
applyPatch({}, [{ op: "rename", path: "/a" }]);
// @ts-expect-error: not a patch format
applyChange({}, {}, "yaml");
// @ts-expect-error: `refused` errors name their path
client.onError((e) => e.type === "refused" && e.path.toFixed());
// @ts-expect-error: the handle's state is read-only
handle.state = undefined;
console.log(wrong);
