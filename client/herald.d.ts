// Types for herald's browser client (`herald.js`, served by herald at /_herald/client.js and
// installable as the npm package `@herald/client`). The wire protocol is docs/PROTOCOL.md.

/** A JSON value, as herald relays it from the upstream. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** One RFC 6902 JSON Patch operation. */
export type JsonPatchOperation =
  | { op: "add" | "replace" | "test"; path: string; value: Json }
  | { op: "remove"; path: string }
  | { op: "move" | "copy"; from: string; path: string };

/** How a `patch` envelope's `data` applies: RFC 6902 JSON Patch or RFC 7386 merge patch. */
export type PatchFormat = "json-patch" | "merge-patch";

/** Apply an RFC 6902 JSON Patch (in place where possible); throws when an operation does not apply. */
export function applyPatch(doc: Json, ops: readonly JsonPatchOperation[]): Json;

/** Apply an RFC 7386 merge patch (in place where possible). */
export function applyMergePatch(doc: Json | undefined, patch: Json): Json;

/**
 * Apply a `patch` envelope's `data` by its `format`; without one (an envelope from an older
 * herald), an array is a JSON Patch and anything else a merge patch. Throws on an unknown format.
 */
export function applyChange(state: Json, data: Json | readonly JsonPatchOperation[], format?: PatchFormat | null): Json;

/** Deep JSON equality (member order does not matter). */
export function equal(a: Json, b: Json): boolean;

/**
 * The connection's status, as far as this tab knows it (a follower tab reports its leader's):
 * - `idle`: nothing watched;
 * - `connecting` / `reconnecting`: opening the stream, or down and about to reopen;
 * - `live`: streaming;
 * - `stopped`: the session expired and was not refreshed: nothing reopens until `reconnect()`;
 * - `closed`: `close()` was called.
 */
export type Status = "idle" | "connecting" | "live" | "reconnecting" | "stopped" | "closed";

/** Why herald refused or ended a watch: its HTTP status and its `{error, message}` body. */
export interface Refusal {
  status?: number;
  /** herald's code: `unauthorized`, `forbidden`, `not-a-stream`, `too-many-watches`, `auth-expired`… */
  error: string;
  message: string;
}

/** An `upstream-error` event's data: the upstream failed; the last state stays valid. */
export interface UpstreamError {
  error: string;
  status?: number;
  message?: string;
}

/** What made a watch's callback run. */
export type WatchEventType =
  /** The whole current state: herald's snapshot, or one this tab already had (a second watch, `from`, another tab's). */
  | "snapshot"
  /** A change, applied. */
  | "patch"
  /** The upstream failed; `info.error` says how, the state is the last good one. */
  | "upstream-error"
  /** herald refused the watch (at open, on the stream, or its watch request): it ends; `info.error` says why. */
  | "refused"
  /** Access ended (the upstream answered 401/403), or the session expired: it ends; `info.error` says why. */
  | "error";

/** The second argument of a watch callback. */
export interface WatchInfo {
  type: WatchEventType;
  /** The watched path, as passed to `watch`. */
  path: string;
  /** herald's name for its topic (the path with only the route's allowed query parameters). */
  topic: string;
  /** The position (`<epoch>-<seq>`) of this state; a later `watch(…, { from: { id, state } })` can start there. */
  id: string | null;
  /** Why the watch ended (a `Refusal`), or the upstream's current failure; null when all is well. */
  error: Refusal | UpstreamError | null;
  /** Events this topic has had in this tab. */
  events: number;
  /** The tab is hidden: the state is kept current; rendering may wait for `visibilitychange`. */
  hidden: boolean;
}

/** A watch callback: the current state (undefined until there is one) and what changed it. */
export type WatchCallback<T> = (state: T | undefined, info: WatchInfo) => void;

/** The state a page already has, and its position (a plain GET's `Herald-Event-Id` header). */
export interface From<T> {
  /** The position; without one the stream starts with a snapshot, which replaces `state`. */
  id?: string | null;
  state: T;
}

export interface WatchOptions<T> {
  /** Start from this state: only the changes after `id` are applied (a snapshot, if herald sends one, wins). */
  from?: From<T>;
}

/** One watch; `close()` ends it (the stream drops the path once no callback and no tab wants it). */
export interface WatchHandle<T> {
  readonly path: string;
  /** The current state, or undefined until there is one. */
  readonly state: T | undefined;
  readonly error: Refusal | UpstreamError | null;
  close(): void;
}

/** What `onError` listeners receive. */
export type HeraldError =
  /** herald refused a watch of this tab (HTTP answer at open, a `refused` event, or its watch request). */
  | ({ type: "refused"; path: string } & Refusal)
  /** Access to a watched topic ended (an `error` event), or the access token could not be read (`path` absent). */
  | ({ type: "error"; path?: string } & Refusal)
  /** The stream's credential expired (`auth-expired`): it ended. With `refresh`, the client tries once to go on with a new token. */
  | ({ type: "auth-expired"; status: 401; expired_at?: string } & Refusal)
  /** `refresh` threw, or herald refused the new credential: the stream keeps the old one until it expires. */
  | ({ type: "refresh-failed" } & Refusal);

/** A bearer token, or a function returning the current one (read at every connect). */
export type AccessToken = string | (() => string | null | undefined | Promise<string | null | undefined>);

export interface HeraldOptions {
  /** The multiplexed stream's path (herald's `[mux] path`), default "/_herald/stream"; null: one EventSource per watch. */
  mux?: string | null;
  /** An origin to prefix to every URL (a herald on another origin), default the page's. */
  base?: string;
  /** Send cookies to a herald on another origin (its `[cors]` must allow credentials). */
  withCredentials?: boolean;
  /**
   * Share one stream between the origin's tabs (Web Locks + BroadcastChannel; where either is
   * missing each tab opens its own). Default true. A string shares only between Heralds given
   * the same string (e.g. per user); false keeps this Herald's stream to itself.
   */
  share?: boolean | string;
  /** Sent as the `tokenParam` query parameter of streams, control requests and `fetchAndWatch`. */
  accessToken?: AccessToken;
  /** The query parameter for `accessToken` (the route's `access_token` setting), default "access_token". */
  tokenParam?: string;
  /**
   * Called when the stream's credential is about to expire (`auth-expiring`, in the leader tab
   * only): returns the new token, which herald is given at once (`POST <control>/refresh`) and
   * which later connections use. Also tried once when the credential expired or was refused
   * (401) before giving up. A function `accessToken` is still read at every connect, so keep
   * both in step.
   */
  refresh?: () => string | null | undefined | void | Promise<string | null | undefined | void>;
}

/** Counters of this tab's client. */
export interface HeraldStats {
  /** EventSources this tab opened (0 in a tab that follows another's stream). */
  opens: number;
  /** Events received (from this tab's stream or its leader's). */
  events: number;
  /** Topics started again from a snapshot after a patch did not apply. */
  resyncs: number;
}

/** A set of watches over one connection, shared with the origin's other tabs. */
export class Herald {
  constructor(options?: HeraldOptions);
  readonly status: Status;
  readonly stats: HeraldStats;
  /** The connections this tab holds (one with `mux`, one per watch without; none in a follower tab). */
  readonly conns: ReadonlyMap<string, unknown>;

  /** Watch `path` (a stream route); `onState` runs with the current state after each change. */
  watch<T = Json>(path: string, onState?: WatchCallback<T>, options?: WatchOptions<T>): WatchHandle<T>;

  /**
   * GET `path`, then watch it from that state and its `Herald-Event-Id`. Rejects (with an Error
   * carrying `status`, `error`, `message`) when the GET fails.
   */
  fetchAndWatch<T = Json>(path: string, onState?: WatchCallback<T>): Promise<WatchHandle<T>>;

  /** `fn(status)` now and on every change; returns an unsubscribe function. */
  onStatus(fn: (status: Status) => void): () => void;

  /** `fn(error)` on refusals, ended access, expired sessions and failed refreshes; returns an unsubscribe function. */
  onError(fn: (error: HeraldError) => void): () => void;

  /** Try again after refusals or an expired session (e.g. once the user has logged in again), in every tab. */
  reconnect(): void;

  /** Close every connection and forget every watch. */
  close(): void;

  /** Step back from the shared stream (done on `pagehide` and `freeze`): another tab takes it over. */
  suspend(): void;

  /** Come back after `suspend` (done on `pageshow` and `resume`). */
  resume(): void;
}

/** The default client: one multiplexed connection, shared with the origin's other tabs. */
export const herald: Herald;

/** `herald.watch(path, onState, options)` on the default client. */
export function watch<T = Json>(path: string, onState?: WatchCallback<T>, options?: WatchOptions<T>): WatchHandle<T>;

export default herald;
