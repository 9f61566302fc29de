/**
 * herald.js — the reference browser client for Herald (docs/inbox.md, docs/devices.md).
 *
 * One ES module, no dependencies, no build step: copy it into your app. It does what a web
 * device of a Herald app has to do:
 *
 * - sign the user in and keep a valid delegated access token ({@link LinkSession} for Herald's
 *   embedded issuer, {@link OidcSession} for an external OpenID Connect provider);
 * - register the browser as a subscription, sync the feed with delta, keep a live WebSocket
 *   stream that resumes where it left off, and recover from every kind of drop
 *   ({@link HeraldClient});
 * - change read/dismissed/activated state and delete, optimistically, and share those changes
 *   with the other tabs of the browser at once.
 *
 * ```js
 * import { HeraldClient, LinkSession } from "/inbox/herald.js";
 * const session = LinkSession.fromLocation();
 * await session.ready;
 * const client = new HeraldClient({ baseUrl: "/beta", session });
 * client.addEventListener("change", (e) => render(e.detail)); // {id, notification | null}
 * client.addEventListener("status", (e) => show(e.detail));   // {state, retryAt?}
 * await client.start();
 * ```
 *
 * Expected conditions (server down, token expiry, a session that ends) are reported through
 * events, statuses and rejected promises, never through `console`.
 *
 * @module herald
 */

// Renew access tokens this long before they expire, or at half their life if that is shorter
// (tokens near the end of a session are short; renewing them early gains nothing).
const REFRESH_MARGIN_MS = 60_000;
const REFRESH_SLACK_MS = 2_000; // a refresh token this close to its end is not worth a request
const RENEW_SUBSCRIPTION_MS = 7 * 86_400_000; // renew a subscription with less than this left
const SUBSCRIPTION_TTL_MS = 30 * 86_400_000; // what a renewal asks for (Herald's default TTL)
const BACKOFF_MIN_MS = 1_000;
const BACKOFF_MAX_MS = 30_000;
const STABLE_MS = 10_000; // a connection that stayed up this long resets the backoff
const IMMEDIATE_RETRIES = 3; // reconnects without delay in a row before backing off anyway
// Herald sends a keep-alive every 25 s by default; silence for this long means a dead link
// (laptop sleep, a NAT dropping the flow) that the browser has not noticed.
const SILENCE_MS = 90_000;
const REMOTE_PENDING_MS = 15_000; // another tab's unconfirmed change is shown at most this long
const SIGNIN_GRANT = "urn:herald:params:oauth:grant-type:signin-code";
const THROTTLE_RETRIES = 3; // a 429 from a token endpoint is retried this often (Retry-After)
const THROTTLE_MAX_WAIT_MS = 10_000;
const DELETE_RETRIES = 3; // signing out retries deleting the subscription this often (backoff)
// A client id as `herald app create` accepts it (src/herald/cli/apps.py).
const CLIENT_ID = /^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$/;
const CLOSE_REASONS = { 4401: "tokenExpired", 4404: "subscriptionGone", 4408: "tooSlow", 1012: "shutdown" };

// -- errors --------------------------------------------------------------------------------------

/**
 * The session is over: the refresh token was refused (`invalid_grant`), its session ended, or
 * the user signed out (here or in another tab; then `signedOut` is true). Sign in again to go on.
 */
export class SessionExpired extends Error {
  /**
   * @param {string} [message]
   * @param {{signedOut?: boolean}} [options] `signedOut`: the user signed out (or another user
   *   signed in), as opposed to the session running out.
   */
  constructor(message = "The session has expired; sign in again.", { signedOut = false } = {}) {
    super(message);
    this.name = "SessionExpired";
    /** Whether the session ended by signing out rather than by expiry. */
    this.signedOut = signedOut;
  }
}

/** Signing in did not work: a sign-in code or OIDC response was refused, or did not match. */
export class SignInError extends Error {
  /**
   * @param {string} code OAuth error code (`invalid_grant`, `access_denied`, …) or
   *   `invalid_state` / `unreachable` / `no_app` for problems found by this module.
   * @param {string} message what went wrong, for people.
   */
  constructor(code, message) {
    super(message);
    this.name = "SignInError";
    this.code = code;
  }
}

/** A request could not reach the server (offline, server down, DNS, CORS). Retry later. */
export class NetworkError extends Error {
  /**
   * @param {string} message what could not be reached.
   * @param {{cause?: unknown}} [options] the browser's own error as `cause`.
   */
  constructor(message, options) {
    super(message, options);
    this.name = "NetworkError";
  }
}

/** The server answered with an error status; `code` and `message` come from its Graph error. */
export class HttpError extends Error {
  /**
   * @param {number} status HTTP status.
   * @param {string} code Graph error code (`itemNotFound`, `syncStateNotFound`, …) or OAuth error.
   * @param {string} message the server's message.
   */
  constructor(status, code, message) {
    super(message);
    this.name = "HttpError";
    this.status = status;
    this.code = code;
  }

  /** @param {Response} res @returns {Promise<HttpError>} */
  static async from(res) {
    let body = null;
    try {
      body = await res.json();
    } catch {
      // not JSON: keep the status
    }
    const error = body?.error;
    if (error && typeof error === "object") {
      return new HttpError(res.status, error.code ?? "", error.message ?? res.statusText);
    }
    if (typeof error === "string") {
      // OAuth (RFC 6749 §5.2): {"error": "invalid_grant", "error_description": "…"}
      return new HttpError(res.status, error, body.error_description ?? error);
    }
    return new HttpError(res.status, "", `HTTP ${res.status} ${res.statusText}`.trim());
  }
}

// -- helpers -------------------------------------------------------------------------------------

function base64url(bytes) {
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * Decode base64url (RFC 4648 §5, padding optional), e.g. a VAPID key for
 * `pushManager.subscribe({applicationServerKey})` or a part of a JWT.
 * @param {string} text
 * @returns {Uint8Array}
 * @throws {DOMException} `InvalidCharacterError` when it is not base64url.
 */
export function fromBase64url(text) {
  const raw = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat(-text.length & 3));
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

function randomString(bytes) {
  return base64url(crypto.getRandomValues(new Uint8Array(bytes)));
}

/**
 * The claims (payload) of a JWT, decoded **without verifying** its signature: for decisions of
 * the user interface only (who a token or sign-in code is for, when it ends), never for
 * authorization: the server verifies every token it is given.
 * ```js
 * tokenClaims(accessToken)?.exp; // seconds since the epoch
 * ```
 * @param {string} token a JWT (`header.payload.signature`).
 * @returns {Record<string, any> | null} null when it is not a JWT.
 */
export function tokenClaims(token) {
  try {
    const part = String(token).split(".")[1];
    return JSON.parse(new TextDecoder().decode(fromBase64url(part)));
  } catch {
    return null;
  }
}

/** The user id Herald uses for a delegated token: `oid`, else `sub`. */
function userOf(token) {
  const claims = token ? tokenClaims(token) : null;
  return claims?.oid ?? claims?.sub ?? null;
}

function withLock(name, task) {
  // Web Locks exist only in secure contexts; without them tabs just do a little duplicate work.
  return globalThis.navigator?.locks ? navigator.locks.request(name, task) : task();
}

/**
 * The subscription id, kept in IndexedDB: tabs read and write it under a Web Lock, and only
 * IndexedDB shows a write in one tab to a read in another at once (localStorage reaches other
 * tabs' processes later, so a tab could register a second subscription). Without IndexedDB
 * (some private modes) the given fallback storage is used.
 */
class DeviceStore {
  #fallback;
  #db = null;

  constructor(fallback) {
    this.#fallback = fallback;
  }

  async get(key) {
    const value = await this.#run("readonly", (s) => s.get(key));
    return value === undefined ? this.#fallback.getItem(key) : value;
  }

  async set(key, value) {
    await this.#run("readwrite", (s) => (value === null ? s.delete(key) : s.put(value, key)));
    if (value === null) this.#fallback.removeItem(key);
    else this.#fallback.setItem(key, value);
  }

  async #run(mode, op) {
    const db = await this.#open();
    if (!db) return undefined;
    return new Promise((resolve, reject) => {
      const request = op(db.transaction("device", mode).objectStore("device"));
      request.onsuccess = () => resolve(request.result ?? undefined);
      request.onerror = () => reject(request.error);
    });
  }

  #open() {
    this.#db ??= new Promise((resolve) => {
      if (!globalThis.indexedDB) return resolve(null);
      const request = indexedDB.open("herald", 1);
      request.onupgradeneeded = () => request.result.createObjectStore("device");
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => resolve(null);
    });
    return this.#db;
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * POST a form to a token endpoint. A 429 (too many requests) is retried after its
 * `Retry-After` (1 s if absent, at most 10 s), up to 3 times: a sign-in code is not lost to a
 * busy server.
 */
async function postForm(url, params) {
  for (let attempt = 0; ; attempt++) {
    let res;
    try {
      res = await fetch(url, {
        method: "POST",
        body: new URLSearchParams(params),
        cache: "no-store",
        credentials: "omit",
      });
    } catch (e) {
      throw new NetworkError(`Could not reach ${url}.`, { cause: e });
    }
    if (res.status === 429 && attempt < THROTTLE_RETRIES) {
      const seconds = Number(res.headers.get("Retry-After"));
      const wait = Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : 1000;
      await sleep(Math.min(wait, THROTTLE_MAX_WAIT_MS));
      continue;
    }
    if (!res.ok) throw await HttpError.from(res);
    return res.json();
  }
}

function version(notification) {
  const m = /"(\d+)"/.exec(notification?.["@odata.etag"] ?? "");
  return m ? Number(m[1]) : 0;
}

function deviceName() {
  const data = navigator.userAgentData;
  const ua = navigator.userAgent;
  let browser = "Browser";
  let os = "";
  if (data?.brands?.length) {
    const named = data.brands.filter((b) => !/not.?a.?brand/i.test(b.brand));
    browser = (named.find((b) => b.brand !== "Chromium") ?? named[0] ?? { brand: browser }).brand;
    os = data.platform;
  } else {
    browser = /Firefox\//.test(ua) ? "Firefox" : /Edg\//.test(ua) ? "Edge"
      : /Chrome\//.test(ua) ? "Chrome" : /Safari\//.test(ua) ? "Safari" : browser;
    os = /Windows/.test(ua) ? "Windows" : /iPhone|iPad/.test(ua) ? "iOS"
      : /Mac OS/.test(ua) ? "macOS" : /Android/.test(ua) ? "Android" : /Linux/.test(ua) ? "Linux" : "";
  }
  return (os ? `${browser} on ${os}` : browser).slice(0, 256);
}

// -- sessions ------------------------------------------------------------------------------------

/**
 * The tokens of a signed-in user of one app, kept in `localStorage` under
 * `herald.session.<clientId>` as `{accessToken, refreshToken, expiresAt, refreshExpiresAt}`
 * (times in ms since the epoch, by this browser's clock), so every tab of the browser profile
 * shares them.
 *
 * The base of {@link LinkSession} and {@link OidcSession}; a subclass supplies the refresh
 * grant. {@link HeraldClient} accepts any object with `clientId`, `user`, `ready`, `token()`,
 * `renew()` and an `expired` event.
 *
 * Events:
 * - `expired` ({@link SessionExpired} in `detail.error`): the session is over (refused refresh,
 *   end of session, signed out here or in another tab).
 * - `signedin` (`detail.user`): another tab stored a new session for a different user, or after
 *   this one had ended. Reload to follow it.
 */
export class Session extends EventTarget {
  #key;
  #storage;
  #shared;
  #written = Promise.resolve();
  #refreshing = null;
  #user;
  #ended = false;

  /**
   * @param {{clientId: string | null, storage?: Storage}} options
   */
  constructor({ clientId, storage = globalThis.localStorage }) {
    super();
    /** The app (OAuth client id) the tokens are for; null when it is not known. */
    this.clientId = clientId ?? null;
    /** Settles when sign-in work begun by the constructor (a code exchange) is done. */
    this.ready = Promise.resolve();
    this.#storage = storage;
    this.#shared = new DeviceStore(storage);
    this.#key = this.clientId ? `herald.session.${this.clientId}` : null;
    this.#user = userOf(this.#load()?.accessToken);
    globalThis.addEventListener?.("storage", (e) => this.#onStorage(e));
  }

  /** The signed-in user's id (`oid` or `sub` of the access token), or null. */
  get user() {
    return this.#user;
  }

  /** Whether there is a session that can still produce an access token. */
  get signedIn() {
    const s = this.#load();
    return s !== null && !this.#over(s);
  }

  /**
   * A valid access token: the stored one, or a renewed one when less than a minute is left.
   * Concurrent calls share one refresh, and tabs take turns (Web Lock) and reuse what another
   * tab already renewed. If renewing fails for a transient reason while the current token is
   * still valid, that token is returned.
   * @returns {Promise<string>}
   * @throws {SessionExpired} when the session is over (or there is none).
   * @throws {NetworkError|HttpError} when renewal is needed and fails transiently.
   */
  async token() {
    await this.ready.catch(() => {});
    const s = this.#load();
    if (s === null) throw this.#end("You are not signed in.");
    if (this.#user && userOf(s.accessToken) !== this.#user) {
      // Another user signed in (in another tab): this one never acts with their token.
      throw this.#end("Another user signed in.", { signedOut: true, write: false });
    }
    if (this.#fresh(s)) return s.accessToken;
    return this.#refresh(s.accessToken);
  }

  /**
   * A new access token because the server refused `rejected` (401): refreshes unless another
   * caller or tab has already replaced that token.
   * @param {string} rejected the token the server refused.
   * @returns {Promise<string>}
   * @throws {SessionExpired|NetworkError|HttpError} as {@link Session#token}.
   */
  async renew(rejected) {
    await this.ready.catch(() => {});
    return this.#refresh(rejected, true);
  }

  /**
   * Forget the session in every tab (the server keeps no session state to revoke). The other
   * tabs' sessions end with a {@link SessionExpired} whose `signedOut` is true.
   */
  signOut() {
    this.#end("You signed out.", { signedOut: true });
  }

  /**
   * Store freshly issued tokens (an OAuth token response) as the session.
   * @protected
   * @param {{access_token: string, expires_in?: number, refresh_token?: string,
   *   refresh_token_expires_in?: number, refresh_expires_in?: number}} body
   * @param {object | null} [previous] the session being refreshed: keeps its refresh token and
   *   end when the response has none.
   */
  _store(body, previous = null) {
    if (!this.#key) throw new SignInError("no_app", "No app (client id) to sign in to.");
    if (typeof body?.access_token !== "string") {
      throw new SignInError("invalid_response", "The token response has no access token.");
    }
    const now = Date.now();
    const exp = tokenClaims(body.access_token)?.exp;
    const refreshIn = body.refresh_token_expires_in ?? body.refresh_expires_in; // Keycloak: 0 = none
    const session = {
      issuedAt: now,
      accessToken: body.access_token,
      refreshToken: body.refresh_token ?? previous?.refreshToken ?? null,
      expiresAt: body.expires_in ? now + body.expires_in * 1000 : exp ? exp * 1000 : now + 300_000,
      refreshExpiresAt: refreshIn ? now + refreshIn * 1000 : previous?.refreshExpiresAt ?? null,
    };
    this.#storage.setItem(this.#key, JSON.stringify(session));
    this.#written = this.#shared.set(this.#key, JSON.stringify(session)).catch(() => {});
    this.#user = userOf(session.accessToken);
    this.#ended = false;
    return session;
  }

  /**
   * Ask the token endpoint for new tokens with a refresh token.
   * @protected
   * @abstract
   * @param {string} refreshToken
   * @returns {Promise<object>} the token response.
   */
  async _refreshGrant(refreshToken) {
    throw new Error(`${this.constructor.name} cannot refresh ${refreshToken ? "tokens" : ""}`);
  }

  #load() {
    if (!this.#key) return null;
    try {
      const s = JSON.parse(this.#storage.getItem(this.#key));
      return typeof s?.accessToken === "string" && typeof s.expiresAt === "number" ? s : null;
    } catch {
      return null;
    }
  }

  /**
   * The session as the token lock's holder must see it: the newer of IndexedDB's copy and
   * localStorage's. Another tab's refresh reaches this tab's localStorage only some time after
   * it released the lock, and a refresh token used twice ends the session at IdPs that rotate
   * them; IndexedDB has the write at once. A sign-out mark counts as the newest word.
   */
  async #loadLatest() {
    const parse = (raw) => {
      try {
        return JSON.parse(raw);
      } catch {
        return null;
      }
    };
    const shared = parse(await this.#shared.get(this.#key).catch(() => null));
    const local = parse(this.#storage.getItem(this.#key));
    const stamp = (x) => x?.signedOutAt ?? x?.issuedAt ?? 0;
    const newest = stamp(shared) >= stamp(local) ? shared : local;
    const valid = typeof newest?.accessToken === "string" && typeof newest.expiresAt === "number";
    return valid ? newest : null;
  }

  #fresh(s, now = Date.now()) {
    const life = s.expiresAt - (s.issuedAt ?? s.expiresAt - 2 * REFRESH_MARGIN_MS);
    return s.expiresAt - now > Math.min(REFRESH_MARGIN_MS, life / 2);
  }

  /** Whether the refresh token has more than `slack` ms left (or no known end). */
  #refreshable(s, slack, now = Date.now()) {
    return Boolean(s.refreshToken) && !(s.refreshExpiresAt && s.refreshExpiresAt - now <= slack);
  }

  #over(s, now = Date.now()) {
    return !this.#refreshable(s, 0, now) && s.expiresAt <= now;
  }

  #refresh(stale, force = false) {
    this.#refreshing ??= withLock(`herald.session.${this.clientId}`, async () => {
      const s = await this.#loadLatest();
      if (s === null) throw this.#end();
      const left = s.expiresAt - Date.now();
      if (s.accessToken !== stale && (force ? left > 0 : this.#fresh(s))) {
        return s.accessToken; // another tab (or call) renewed it meanwhile
      }
      // While the access token lasts, a session about to end is not worth a request; once it is
      // gone, any time the session has left is (the server, not this guess, says when it ends).
      const needed = force || left <= 0;
      if (!this.#refreshable(s, needed ? 0 : REFRESH_SLACK_MS)) {
        if (!needed) return s.accessToken; // the last one this session gets
        throw this.#end();
      }
      try {
        const next = this._store(await this._refreshGrant(s.refreshToken), s);
        await this.#written; // before the lock goes: the next tab in it reads IndexedDB
        return next.accessToken;
      } catch (e) {
        if (e instanceof HttpError && (e.status === 400 || e.status === 401)) throw this.#end();
        if (!force && left > 5_000) return s.accessToken; // still good for a while: retry later
        throw e;
      }
    }).finally(() => {
      this.#refreshing = null;
    });
    return this.#refreshing;
  }

  /**
   * End the session here: `signedOut` leaves a mark (`{signedOutAt}`) in place of the tokens so
   * that the other tabs can tell a sign-out from an expiry; `write: false` only ends this tab.
   */
  #end(message, { signedOut = false, write = true } = {}) {
    if (!signedOut && this.#signedOutMark()) {
      signedOut = true; // signed out in another tab (before this tab heard of it): keep the mark
      write = false;
      message = "You signed out in another tab.";
    }
    const error = new SessionExpired(message, { signedOut });
    if (this.#key && write) {
      const mark = signedOut ? JSON.stringify({ signedOutAt: Date.now() }) : null;
      if (mark) this.#storage.setItem(this.#key, mark);
      else this.#storage.removeItem(this.#key);
      this.#written = this.#shared.set(this.#key, mark).catch(() => {});
    }
    if (!this.#ended && this.#user) {
      this.#ended = true;
      this.dispatchEvent(new CustomEvent("expired", { detail: { error } }));
    }
    return error;
  }

  #signedOutMark() {
    try {
      return this.#key ? Boolean(JSON.parse(this.#storage.getItem(this.#key))?.signedOutAt) : false;
    } catch {
      return false;
    }
  }

  #onStorage(e) {
    if (e.key !== this.#key || (e.storageArea && e.storageArea !== this.#storage)) return;
    let user = null;
    let signedOut = false;
    try {
      const value = JSON.parse(e.newValue);
      user = userOf(value?.accessToken);
      signedOut = Boolean(value?.signedOutAt);
    } catch {
      // removed or garbled: no session
    }
    if (user === null) {
      this.#end(signedOut ? "You signed out in another tab." : "The session has ended.",
        { signedOut, write: false });
    } else if (user !== this.#user || this.#ended) {
      this.dispatchEvent(new CustomEvent("signedin", { detail: { user } }));
    }
  }
}

/**
 * Sign-in links of Herald's embedded issuer (`herald signin --app <clientId> --user <id>` →
 * `/inbox/?app=<clientId>#signin=<code>`): exchanges the single-use code for tokens and renews
 * them with the refresh token until the session ends (14 days by default).
 */
export class LinkSession extends Session {
  #tokenEndpoint;
  #storage;
  #pending;

  /**
   * @param {{clientId: string | null, storage?: Storage, pending?: Storage,
   *   tokenEndpoint?: string}} options `tokenEndpoint` defaults to Herald's
   *   `/oauth2/v2.0/token`; `pending` (default `sessionStorage`) keeps a sign-in code until its
   *   exchange succeeded or was refused, so a reload retries one that failed for a while.
   */
  constructor({ clientId, storage = globalThis.localStorage, pending, tokenEndpoint = "/oauth2/v2.0/token" }) {
    super({ clientId, storage });
    this.#tokenEndpoint = tokenEndpoint;
    this.#storage = storage;
    this.#pending = pending ?? globalThis.sessionStorage ?? null;
    /**
     * True when the URL's `?app=` is not a valid client id: it was ignored (never show it).
     * @type {boolean}
     */
    this.invalidApp = false;
    /**
     * A sign-in link for another user than the one signed in: `{code, user}` (`user` read from
     * the code, unverified; null if unreadable). The code is not exchanged until the page
     * asks the person and calls {@link LinkSession#signIn} (after signing the current user
     * out) or {@link LinkSession#discardSignIn}. Null otherwise.
     * @type {{code: string, user: string | null} | null}
     */
    this.pendingSignIn = null;
  }

  /**
   * Whether `id` is a client id as Herald accepts it (`^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$`).
   * @param {unknown} id
   * @returns {boolean}
   */
  static isClientId(id) {
    return typeof id === "string" && CLIENT_ID.test(id);
  }

  /**
   * The session for the page's URL. The app is `clientId`, else `?app=`, else the last app
   * this browser signed in to (`localStorage` `herald.app`, so `/inbox/` opened from a desktop
   * notification works); an app that is not a valid client id is ignored (`invalidApp`). A
   * `#signin=<code>` fragment is removed from the address bar at once (keeping `?app=`) and
   * exchanged; `ready` settles when that is done and rejects with a {@link SignInError} if the
   * code is refused (a session stored before stays usable). A code for another user than the
   * one signed in is not exchanged: it waits in `pendingSignIn` for the page to ask.
   * @param {{clientId?: string, location?: Location, history?: History, storage?: Storage,
   *   pending?: Storage, tokenEndpoint?: string}} [options]
   * @returns {LinkSession}
   */
  static fromLocation({
    clientId,
    location = globalThis.location,
    history = globalThis.history,
    storage = globalThis.localStorage,
    pending,
    tokenEndpoint,
  } = {}) {
    const url = new URL(location.href);
    const given = clientId || url.searchParams.get("app") || null;
    let app = given ?? storage.getItem("herald.app");
    const invalidApp = !LinkSession.isClientId(app) && given !== null;
    if (!LinkSession.isClientId(app)) app = null;
    let code = new URLSearchParams(url.hash.slice(1)).get("signin");
    if (code !== null) history.replaceState(history.state, "", url.pathname + url.search);
    const session = new LinkSession({ clientId: app, storage, pending, tokenEndpoint });
    session.invalidApp = invalidApp;
    if (app) {
      const key = `herald.signin.${app}`;
      try {
        if (code !== null) session.#pending?.setItem(key, code);
        else code = session.#pending?.getItem(key) ?? null;
      } catch {
        // no sessionStorage: the code lives in this page only
      }
    }
    if (code === null) return session;
    const next = userOf(code);
    if (app && session.signedIn && next !== session.user) {
      session.pendingSignIn = { code, user: next };
    } else {
      session.ready = session.signIn(code);
    }
    return session;
  }

  /** Forget the sign-in code waiting in `pendingSignIn` (the person stays as they are). */
  discardSignIn() {
    this.pendingSignIn = null;
    this.#forgetCode();
  }

  #forgetCode() {
    try {
      if (this.clientId) this.#pending?.removeItem(`herald.signin.${this.clientId}`);
    } catch {
      // nothing kept
    }
  }

  /**
   * Exchange a sign-in code for a session (replacing any stored one). A throttled exchange
   * (429) is retried after `Retry-After`; the code is kept (`pending`) until the exchange
   * succeeded or was refused. On success the app is remembered (`herald.app`).
   * @param {string} code
   * @returns {Promise<void>}
   * @throws {SignInError} refused (`invalid_grant`: unknown, expired, used, or for another
   *   app), still throttled (`slow_down`), unreachable server, or no app.
   */
  async signIn(code) {
    if (!this.clientId) throw new SignInError("no_app", "The sign-in link names no app (?app=).");
    this.pendingSignIn = null;
    try {
      const body = await postForm(this.#tokenEndpoint, {
        grant_type: SIGNIN_GRANT,
        code,
        client_id: this.clientId,
      });
      this._store(body);
      this.#forgetCode();
      this.#storage.setItem("herald.app", this.clientId);
    } catch (e) {
      if (e instanceof HttpError && e.status !== 429 && e.status < 500) this.#forgetCode();
      if (e instanceof HttpError) throw new SignInError(e.code || "invalid_grant", e.message);
      if (e instanceof NetworkError) throw new SignInError("unreachable", e.message);
      throw e;
    }
  }

  /** @protected */
  _refreshGrant(refreshToken) {
    return postForm(this.#tokenEndpoint, {
      grant_type: "refresh_token",
      refresh_token: refreshToken,
      client_id: this.clientId,
    });
  }
}

/**
 * Sign-in with an external OpenID Connect provider: authorization code flow with PKCE (S256)
 * for a public client, `redirect_uri` = `<origin>/inbox/` by default, renewal with the
 * provider's refresh tokens (ask for `offline_access` or its equivalent).
 */
export class OidcSession extends Session {
  #metadata = null;

  /**
   * @param {{issuer: string, clientId: string, scope?: string, redirectUri?: string,
   *   storage?: Storage, pending?: Storage}} config `pending` (default `sessionStorage`)
   *   keeps the PKCE verifier and state across the redirect.
   */
  constructor({ issuer, clientId, scope = "openid", redirectUri, storage, pending }) {
    super({ clientId, storage });
    this.issuer = issuer;
    this.scope = scope;
    this.redirectUri = redirectUri ?? `${location.origin}/inbox/`;
    this.pending = pending ?? globalThis.sessionStorage;
  }

  /**
   * A session for the page's config (`/inbox/config.json`). Starts loading the provider's
   * discovery document; a provider that cannot be reached now is asked again when needed, so a
   * stored session keeps working meanwhile.
   * @param {{issuer: string, clientId: string, scope?: string, redirectUri?: string}} config
   * @returns {Promise<OidcSession>}
   */
  static async load(config) {
    const session = new OidcSession(config);
    await session.metadata().catch(() => {});
    return session;
  }

  /**
   * The provider's metadata (`<issuer>/.well-known/openid-configuration`), fetched once.
   * @returns {Promise<{authorization_endpoint: string, token_endpoint: string}>}
   * @throws {NetworkError|HttpError}
   */
  metadata() {
    this.#metadata ??= (async () => {
      const url = `${this.issuer.replace(/\/+$/, "")}/.well-known/openid-configuration`;
      let res;
      try {
        res = await fetch(url, { credentials: "omit" });
      } catch (e) {
        throw new NetworkError(`Could not reach the sign-in service at ${url}.`, { cause: e });
      }
      if (!res.ok) throw await HttpError.from(res);
      return res.json();
    })().catch((e) => {
      this.#metadata = null;
      throw e;
    });
    return this.#metadata;
  }

  /**
   * Go to the provider's sign-in page (the page navigates away). The query of the current
   * URL (e.g. `?activate=`) is restored when the user comes back.
   * @returns {Promise<void>}
   * @throws {NetworkError|HttpError} the provider's metadata cannot be loaded;
   *   {@link SignInError} `insecure` without `crypto.subtle` (plain http, not localhost).
   */
  async begin() {
    if (!globalThis.crypto?.subtle) {
      throw new SignInError("insecure", "Signing in needs a secure (https) page.");
    }
    const meta = await this.metadata();
    const verifier = randomString(32); // 43 characters (RFC 7636 §4.1)
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
    const state = randomString(16);
    this.pending.setItem(
      `herald.oidc.${this.clientId}`,
      JSON.stringify({ state, verifier, search: location.search }),
    );
    const url = new URL(meta.authorization_endpoint);
    url.search = new URLSearchParams({
      ...Object.fromEntries(url.searchParams),
      response_type: "code",
      client_id: this.clientId,
      redirect_uri: this.redirectUri,
      scope: this.scope,
      state,
      code_challenge: base64url(new Uint8Array(digest)),
      code_challenge_method: "S256",
    }).toString();
    location.assign(url.href);
  }

  /**
   * Finish a sign-in when the page is the provider's redirect (`?code=&state=` or `?error=`):
   * checks `state`, exchanges the code with the PKCE verifier, stores the session, and takes
   * the response parameters out of the address bar.
   * @returns {Promise<boolean>} true when it signed in; false when the URL is no redirect.
   * @throws {SignInError} a state that does not match a sign-in begun in this tab
   *   (`invalid_state`, checked first, for error answers too), the provider's `?error=`, or a
   *   refused exchange.
   */
  async complete() {
    const url = new URL(location.href);
    const q = url.searchParams;
    if (!q.has("code") && !q.has("error")) return false;
    const key = `herald.oidc.${this.clientId}`;
    let pending = null;
    try {
      pending = JSON.parse(this.pending.getItem(key));
    } catch {
      // none
    }
    this.pending.removeItem(key);
    const { code, state, error, iss } = Object.fromEntries(q);
    const description = q.get("error_description");
    for (const name of ["code", "state", "error", "error_description", "error_uri", "iss", "session_state"]) {
      q.delete(name);
    }
    const back = pending?.search ? pending.search : url.search;
    history.replaceState(history.state, "", url.pathname + back);
    // The state binds error answers too (RFC 6749 §4.1.2.1): an unsolicited "error" is anyone's
    // link, and its description must not be shown as the provider's word.
    if (!pending || state !== pending.state) {
      throw new SignInError("invalid_state", "This sign-in answer does not match a sign-in begun here.");
    }
    if (error) throw new SignInError(error, description || `Sign-in failed (${error}).`);
    if (iss && iss !== this.issuer) {
      throw new SignInError("invalid_issuer", "The sign-in answer came from another issuer.");
    }
    try {
      const meta = await this.metadata();
      const body = await postForm(meta.token_endpoint, {
        grant_type: "authorization_code",
        code,
        redirect_uri: this.redirectUri,
        client_id: this.clientId,
        code_verifier: pending.verifier,
      });
      this._store(body);
    } catch (e) {
      if (e instanceof HttpError) throw new SignInError(e.code || "invalid_grant", e.message);
      if (e instanceof NetworkError) throw new SignInError("unreachable", e.message);
      throw e;
    }
    return true;
  }

  /** @protected */
  async _refreshGrant(refreshToken) {
    const meta = await this.metadata();
    return postForm(meta.token_endpoint, {
      grant_type: "refresh_token",
      refresh_token: refreshToken,
      client_id: this.clientId,
    });
  }
}

// -- the client ----------------------------------------------------------------------------------

/**
 * Whether a notification is meant for browsers: its `targetPolicy.platformTypes` includes
 * `webPush`. The stream leaves the others out for this subscription; delta does not filter, so
 * the feed is filtered here too, and one notification never shows or hides by how it arrived.
 * @param {object} n a notification
 */
function forBrowsers(n) {
  const types = n.targetPolicy?.platformTypes;
  return !Array.isArray(types) || types.includes("webPush");
}

/**
 * One web device of a Herald app for the signed-in user: the subscription, the feed (delta
 * sync + live WebSocket stream with resume) and state changes.
 *
 * Guarantees: the feed converges to the server's (every change is applied once, in order, by
 * change-log position; a newer version of a notification is never replaced by an older one);
 * drops are retried forever with backoff (1 s doubling to 30 s, with jitter) until
 * {@link HeraldClient#stop} or the session ends; notifications are removed locally when their
 * `expirationDateTime` passes.
 *
 * Events (all `CustomEvent`s):
 * - `change` — `{id, notification}`: the notification as it now shows (null: gone).
 * - `status` — `{state, retryAt?}`: `connecting` (first connect), `live`, `reconnecting`
 *   (`retryAt`: ms since the epoch of the next attempt while waiting), `expired` (session
 *   over), `signed-out`.
 * - `app` — `{application, applicationServerKey}`: the app's host name and VAPID key.
 * - `error` — `{error}`: an unexpected server answer (e.g. 403: the app is not registered);
 *   the client keeps retrying.
 */
export class HeraldClient extends EventTarget {
  #base;
  #session;
  #device;
  #channel = null;
  #app = null;
  #subscription = null;
  #pushChannel; // undefined: leave as the server has it
  #position = null;
  #server = new Map(); // id → notification, as the server last said
  #removed = new Set(); // ids deleted or expired: late echoes must not bring them back
  #pending = new Map(); // id → [{key, patch}] unconfirmed changes (patch null: delete)
  #running = false;
  #state = null;
  #retryAt;
  #socket = null;
  #wake = null;
  #started = null;
  #startedSettle = null;
  #expiryTimer = null;
  #tab = randomString(6);
  #seq = 0;
  #onOnline = () => this.reconnect();
  #onExpired = (e) => this.#expire(e?.detail?.error);

  /**
   * @param {{baseUrl?: string, session: Session, storage?: Storage}} options `baseUrl` is the
   *   Graph version root (`/beta` or `/v1.0`, or an absolute URL); `storage` (default
   *   `localStorage`) keeps the subscription id per app and user.
   */
  constructor({ baseUrl = "/beta", session, storage = globalThis.localStorage }) {
    super();
    this.#base = baseUrl.replace(/\/+$/, "");
    this.#session = session;
    this.#device = new DeviceStore(storage);
  }

  /** The signed-in user's id. */
  get user() {
    return this.#session.user;
  }

  /** The app's host name, once learned. */
  get application() {
    return this.#app?.application ?? null;
  }

  /** The app's VAPID public key (base64url), for `pushManager.subscribe`. */
  get applicationServerKey() {
    return this.#app?.applicationServerKey ?? null;
  }

  /** This browser's subscription as the server last returned it, or null. */
  get subscription() {
    return this.#subscription;
  }

  /** The last change-log position applied, or null before the first sync. */
  get position() {
    return this.#position;
  }

  /** The current status (`connecting`, `live`, …), or null before `start()`. */
  get state() {
    return this.#state;
  }

  /**
   * Start: learn the app, register or reuse this browser's subscription, sync with delta, and
   * keep a live stream. Resolves once the feed is loaded (the stream opens after); while the
   * server is unreachable it keeps trying and stays pending. Calling it again returns the same
   * promise.
   * @returns {Promise<void>}
   * @throws {SessionExpired} the session ended before the feed was loaded.
   */
  start() {
    if (this.#started) return this.#started;
    this.#started = new Promise((resolve, reject) => {
      this.#startedSettle = { resolve, reject };
    });
    this.#running = true;
    this.#session.addEventListener("expired", this.#onExpired);
    globalThis.addEventListener?.("online", this.#onOnline);
    this.#run();
    return this.#started;
  }

  /** Stop streaming and retrying; the feed stays as it was. */
  stop() {
    this.#halt(new Error("The client was stopped."));
  }

  #halt(reason) {
    if (!this.#running) return;
    this.#running = false;
    this.#session.removeEventListener("expired", this.#onExpired);
    globalThis.removeEventListener?.("online", this.#onOnline);
    const ws = this.#socket;
    // Closing a socket still connecting makes the browser log a warning: close it once open.
    if (ws?.readyState === WebSocket.CONNECTING) ws.onopen = () => ws.close(1000);
    else ws?.close(1000);
    this.#wake?.();
    this.#channel?.close();
    this.#channel = null;
    clearTimeout(this.#expiryTimer);
    this.#startedSettle?.reject(reason);
    this.#startedSettle = null;
  }

  /** While waiting to reconnect, try now instead (e.g. a "Retry now" button, or back online). */
  reconnect() {
    this.#wake?.();
  }

  /**
   * Sign out: take an access token, end the session in every tab (they stop and never
   * register again), stop, run `cleanup` (e.g. unsubscribe the browser's `PushSubscription`),
   * then delete this browser's subscription with that token (best effort: retried with backoff
   * while the server cannot be reached) and forget its id. The status is `signed-out` at once;
   * the promise settles when the deletion is done or given up.
   * @param {{cleanup?: () => (void | Promise<void>)}} [options]
   * @returns {Promise<void>}
   */
  async signOut({ cleanup } = {}) {
    let token = null;
    try {
      token = await this.#session.token();
    } catch {
      // over already, or not renewable now: nothing to delete the subscription with
    }
    const key = this.#subscriptionKey();
    const id = this.#subscription?.id ?? (await this.#device.get(key).catch(() => null));
    this.stop();
    this.#session.signOut();
    this.#setStatus("signed-out");
    try {
      await cleanup?.();
    } catch {
      // best effort
    }
    if (id && token) await this.#deleteSubscription(id, token);
    await this.#device.set(key, null).catch(() => {});
  }

  async #deleteSubscription(id, token) {
    const url = `${this.#base}/me/notificationSubscriptions/${encodeURIComponent(id)}`;
    for (let attempt = 0; attempt <= DELETE_RETRIES; attempt++) {
      if (attempt) await sleep(BACKOFF_MIN_MS * 2 ** (attempt - 1));
      try {
        const res = await fetch(url, {
          method: "DELETE",
          headers: { Authorization: `Bearer ${token}` },
          cache: "no-store",
        });
        // Gone (204, 404) or not ours to delete any more (401, 403): done. Retry 429 and 5xx.
        if (res.status !== 429 && res.status < 500) return;
      } catch {
        // unreachable: retry
      }
    }
  }

  /**
   * The notifications as they show now (unconfirmed changes applied), newest first by
   * `createdDateTime`. Dismissed ones are included: hiding them is the page's choice.
   * @returns {object[]}
   */
  notifications() {
    const list = [];
    for (const id of this.#server.keys()) {
      const n = this.get(id);
      if (n) list.push(n);
    }
    return list.sort((a, b) =>
      b.createdDateTime.localeCompare(a.createdDateTime) || (a.id < b.id ? 1 : -1));
  }

  /**
   * One notification as it shows now, or null.
   * @param {string} id
   */
  get(id) {
    let n = this.#server.get(id) ?? null;
    for (const { patch } of this.#pending.get(id) ?? []) {
      if (n === null) break;
      n = patch === null ? null : { ...n, ...patch };
    }
    return n;
  }

  /**
   * Mark read. Shows at once (here and in the other tabs), rolls back if the server refuses.
   * @param {string} id
   * @returns {Promise<object | null>} the notification as it shows after the server's answer;
   *   null if it no longer exists (it is removed).
   * @throws {HttpError|NetworkError|SessionExpired} after rolling back.
   */
  markRead(id) {
    return this.#patch(id, { readState: "read" });
  }

  /** Mark unread; as {@link HeraldClient#markRead}. @param {string} id */
  markUnread(id) {
    return this.#patch(id, { readState: "unread" });
  }

  /** Dismiss (`userActionState: dismissed`); as {@link HeraldClient#markRead}. @param {string} id */
  dismiss(id) {
    return this.#patch(id, { userActionState: "dismissed" });
  }

  /**
   * The user opened it (clicked a desktop notification): `activated` and read; as
   * {@link HeraldClient#markRead}.
   * @param {string} id
   */
  activate(id) {
    return this.#patch(id, { userActionState: "activated", readState: "read" });
  }

  /**
   * Delete it for every device of the user. Shows at once, rolls back if the server refuses;
   * a notification already gone (404) counts as deleted.
   * @param {string} id
   * @returns {Promise<void>}
   * @throws {HttpError|NetworkError|SessionExpired} after rolling back.
   */
  async remove(id) {
    const key = this.#begin(id, null);
    try {
      await this.#request("DELETE", `/me/notifications/${encodeURIComponent(id)}`);
    } catch (e) {
      if (e?.status !== 404) {
        this.#settle(id, key, {});
        throw e;
      }
    }
    this.#settle(id, key, { removed: true });
  }

  /**
   * The signed-in user's notification preferences for this app (docs/api.md, "Notification
   * preferences"): `{mutedGroups, mutedPlatforms, quietHours, lastModifiedDateTime}`.
   * @returns {Promise<object>}
   * @throws {HttpError|NetworkError|SessionExpired}
   */
  preferences() {
    return this.#request("GET", "/me/notificationPreferences");
  }

  /**
   * Change them: the properties given replace the stored ones (`quietHours: null` turns quiet
   * hours off); answers the preferences as stored.
   * @param {object} patch
   * @returns {Promise<object>}
   * @throws {HttpError} refused (400 names the bad property); {@link NetworkError};
   *   {@link SessionExpired}.
   */
  setPreferences(patch) {
    return this.#request("PATCH", "/me/notificationPreferences", patch);
  }

  /**
   * Set this browser's push channel (`PushSubscription.toJSON()`), or clear it with null (the
   * device goes live-only). Call `start()` first; this waits until it has the subscription.
   * The channel is remembered and sent again if the subscription has to be registered anew.
   * @param {object | null} channel
   * @returns {Promise<object>} the subscription.
   * @throws {HttpError} refused (e.g. 400 for an endpoint Herald does not accept);
   *   {@link NetworkError}; {@link SessionExpired}; `Error` if the client is not started.
   */
  async setPushChannel(channel) {
    if (!this.#started) throw new Error("Call start() before setPushChannel().");
    this.#pushChannel = channel ?? null;
    await this.#started;
    for (let attempt = 0; ; attempt++) {
      const sub = this.#subscription;
      const same = channel
        ? sub.pushChannel?.endpoint === channel.endpoint && !sub.deliveryState?.goneDateTime
        : !sub.pushChannel;
      if (same) return sub;
      try {
        this.#subscription = await this.#request("PATCH", this.#subscriptionPath(), {
          pushChannel: this.#pushChannel,
        });
        return this.#subscription;
      } catch (e) {
        if (e?.status !== 404 || attempt > 0) throw e;
        await this.#register(sub.id);
      }
    }
  }

  // -- the connection loop ----------------------------------------------------------------------

  async #run() {
    let failures = 0;
    let immediate = 0;
    this.#setStatus("connecting");
    while (this.#running) {
      let now = false;
      try {
        await this.#prepare();
        this.#startedSettle?.resolve();
        this.#startedSettle = null;
        const end = await this.#stream();
        if (!this.#running) return;
        if (end.readyAt) {
          immediate = 0;
          if (Date.now() - end.readyAt >= STABLE_MS) failures = 0;
        }
        if (end.reason === "tokenExpired") {
          await this.#session.renew(end.token);
          now = true;
        } else if (end.reason === "subscriptionGone") {
          await this.#register(this.#subscription?.id);
          now = true;
        } else if (!end.readyAt) {
          now = await this.#diagnose(end.token);
        }
      } catch (e) {
        if (!this.#running) return;
        if (e instanceof SessionExpired) return this.#expire(e);
        if (!(e instanceof NetworkError) && !(e instanceof HttpError && e.status >= 500)) {
          this.dispatchEvent(new CustomEvent("error", { detail: { error: e } }));
        }
      }
      if (!this.#running) return;
      if (now && immediate++ < IMMEDIATE_RETRIES) {
        this.#setStatus("reconnecting");
        continue;
      }
      const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** failures++);
      const wait = delay * (0.75 + Math.random() * 0.5);
      this.#setStatus("reconnecting", Date.now() + wait);
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, wait);
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#wake = null;
      if (this.#running) this.#setStatus("reconnecting");
    }
  }

  /** What is missing before a stream can open: the app, the subscription, a synced feed. */
  async #prepare() {
    if (!this.#app) {
      this.#app = await this.#request("GET", "/webPushKey");
      this.dispatchEvent(new CustomEvent("app", { detail: { ...this.#app } }));
    }
    if (!this.#channel && globalThis.BroadcastChannel) {
      this.#channel = new BroadcastChannel(`herald.${this.#session.clientId}.${this.user}`);
      this.#channel.onmessage = (e) => this.#onBroadcast(e.data);
    }
    if (!this.#subscription) await this.#register();
    if (this.#position === null) await this.#sync(null);
  }

  /**
   * Reuse the stored subscription or register one, under a Web Lock so that tabs opened
   * together make one. `gone`: an id known to be gone (not to be reused).
   */
  async #register(gone) {
    const key = this.#subscriptionKey();
    this.#subscription = await withLock("herald-register", async () => {
      // A client stopped meanwhile (signed out in any tab) never registers again.
      if (!this.#running) throw new SessionExpired("The client was stopped.", { signedOut: true });
      await this.#session.token(); // throws once the session is over, as stored now
      const id = await this.#device.get(key);
      let sub = null;
      if (id && id !== gone) {
        try {
          sub = await this.#request("GET", `/me/notificationSubscriptions/${encodeURIComponent(id)}`);
        } catch (e) {
          if (e?.status !== 404) throw e;
        }
      }
      if (sub && Date.parse(sub.expirationDateTime) - Date.now() < RENEW_SUBSCRIPTION_MS) {
        const expirationDateTime = new Date(Date.now() + SUBSCRIPTION_TTL_MS).toISOString();
        sub = await this.#request("PATCH", `/me/notificationSubscriptions/${encodeURIComponent(sub.id)}`,
          { expirationDateTime }).catch((e) => {
          if (e?.status === 400) return sub; // the server allows less: keep it until it ends
          throw e;
        });
      }
      if (!sub) {
        if (!this.#running) throw new SessionExpired("The client was stopped.", { signedOut: true });
        const body = { application: this.#app.application, platform: "webPush", displayName: deviceName() };
        if (this.#pushChannel) body.pushChannel = this.#pushChannel;
        sub = await this.#request("POST", "/me/notificationSubscriptions", body);
        await this.#device.set(key, sub.id);
      }
      return sub;
    });
  }

  /**
   * Delta sync: from `after`, or from scratch (null), following nextLinks to the deltaLink.
   * A sync from scratch replaces the feed.
   */
  async #sync(after) {
    const items = [];
    let link = after === null ? "/me/notifications/delta"
      : `/me/notifications/delta?$deltatoken=${after}`;
    let token = null;
    while (link) {
      const page = await this.#request("GET", link);
      items.push(...(page.value ?? []));
      link = page["@odata.nextLink"] ?? null;
      if (!link) token = new URL(page["@odata.deltaLink"] ?? "?", location.href).searchParams.get("$deltatoken");
    }
    if (!/^\d+$/.test(token ?? "")) throw new HttpError(502, "", "The delta sync ended without a delta link.");
    if (after === null) {
      const seen = new Set(items.map((n) => n.id));
      for (const id of [...this.#server.keys()]) if (!seen.has(id)) this.#drop(id);
    }
    for (const item of items) {
      if (item["@removed"]) this.#drop(item.id);
      else this.#put(item, true);
    }
    this.#position = Number(token);
    this.#scheduleExpiry();
  }

  /** One WebSocket stream, until it closes: what happened, for the loop to decide. */
  async #stream() {
    const token = await this.#session.token();
    if (!this.#running) return { token };
    const url = new URL(`${this.#base}${this.#subscriptionPath()}/stream`, location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = new URLSearchParams({ after: String(this.#position), access_token: token });
    return new Promise((resolve) => {
      const end = { token, readyAt: 0, reason: null };
      const ws = new WebSocket(url.href);
      this.#socket = ws;
      let silence = null;
      const listen = () => {
        clearTimeout(silence);
        silence = setTimeout(() => ws.close(4000), SILENCE_MS);
      };
      listen();
      ws.onmessage = (e) => {
        listen();
        let m;
        try {
          m = JSON.parse(e.data);
        } catch {
          return;
        }
        if (m.type === "ready") {
          end.readyAt = Date.now();
          this.#position = Math.max(this.#position, m.position);
          this.#setStatus("live");
        } else if (m.type === "closing") {
          end.reason = m.reason;
        } else if (typeof m.position === "number") {
          this.#apply(m);
        }
      };
      ws.onerror = () => {}; // a close event follows
      ws.onclose = (e) => {
        clearTimeout(silence);
        if (this.#socket === ws) this.#socket = null;
        end.reason ??= CLOSE_REASONS[e.code] ?? null;
        resolve(end);
      };
    });
  }

  /**
   * A browser cannot see why a WebSocket handshake was refused: ask delta from the last
   * position with the same token (devices.md). Returns whether to reconnect at once.
   */
  async #diagnose(token) {
    try {
      await this.#sync(this.#position); // a 401 renews the token on the way; missed changes apply
    } catch (e) {
      if (e?.status !== 410) throw e;
      this.#position = null; // history pruned past our position: resync from scratch
      return true;
    }
    if ((await this.#session.token()) !== token) return true;
    try {
      await this.#request("GET", this.#subscriptionPath());
    } catch (e) {
      if (e?.status !== 404) throw e;
      await this.#register(this.#subscription?.id);
      return true;
    }
    return false;
  }

  #apply(m) {
    if (m.position <= this.#position) return; // seen already (replay around a reconnect)
    this.#position = m.position;
    if (m.type === "created" || m.type === "updated") {
      this.#put(m.notification, m.type === "created");
    } else if (m.type === "deleted" || m.type === "expired") {
      this.#drop(m.id);
    }
    this.#scheduleExpiry();
  }

  // -- the feed ---------------------------------------------------------------------------------

  /** Store a server version of a notification; `revive`: it may come back after a removal. */
  #put(n, revive) {
    if (!n?.id) return;
    if (this.#removed.has(n.id)) {
      if (!revive) return;
      this.#removed.delete(n.id);
    }
    if (Date.parse(n.expirationDateTime) <= Date.now()) return this.#drop(n.id);
    if (!forBrowsers(n)) {
      // Not for browsers (now): not shown, but not removed either: an update may target them.
      if (this.#server.delete(n.id)) this.#emit(n.id);
      return;
    }
    const old = this.#server.get(n.id);
    if (old && version(old) > version(n)) return;
    this.#server.set(n.id, n);
    this.#emit(n.id);
  }

  #drop(id) {
    this.#removed.add(id);
    if (this.#server.delete(id)) this.#emit(id);
  }

  #emit(id) {
    this.dispatchEvent(new CustomEvent("change", { detail: { id, notification: this.get(id) } }));
  }

  #scheduleExpiry() {
    clearTimeout(this.#expiryTimer);
    let next = Infinity;
    for (const n of this.#server.values()) next = Math.min(next, Date.parse(n.expirationDateTime));
    if (next === Infinity) return;
    this.#expiryTimer = setTimeout(() => {
      const now = Date.now();
      for (const n of [...this.#server.values()]) {
        if (Date.parse(n.expirationDateTime) <= now) this.#drop(n.id);
      }
      this.#scheduleExpiry();
    }, Math.min(Math.max(0, next - Date.now()) + 50, 2 ** 31 - 1));
  }

  // -- state changes ----------------------------------------------------------------------------

  async #patch(id, patch) {
    const key = this.#begin(id, patch);
    let n;
    try {
      n = await this.#request("PATCH", `/me/notifications/${encodeURIComponent(id)}`, patch);
    } catch (e) {
      if (e?.status === 404) {
        this.#settle(id, key, { removed: true });
        return null;
      }
      this.#settle(id, key, {});
      throw e;
    }
    this.#settle(id, key, { notification: n });
    return this.get(id);
  }

  /** Show an unconfirmed change at once, here and in the other tabs. */
  #begin(id, patch) {
    const key = `${this.#tab}.${++this.#seq}`;
    this.#addPending(id, key, patch);
    this.#channel?.postMessage({ type: "pending", id, key, patch });
    return key;
  }

  /** The server answered: drop the unconfirmed change and apply what the server said. */
  #settle(id, key, { notification, removed }) {
    this.#channel?.postMessage({ type: "settled", id, key, notification, removed });
    this.#applySettled(id, key, notification, removed);
  }

  #applySettled(id, key, notification, removed) {
    const list = (this.#pending.get(id) ?? []).filter((p) => p.key !== key);
    if (list.length) this.#pending.set(id, list);
    else this.#pending.delete(id);
    if (removed) this.#drop(id);
    else if (notification) this.#put(notification, false);
    this.#emit(id);
    if (notification) this.#scheduleExpiry();
  }

  #addPending(id, key, patch) {
    const list = this.#pending.get(id) ?? [];
    list.push({ key, patch });
    this.#pending.set(id, list);
    this.#emit(id);
  }

  #onBroadcast(m) {
    if (!m || typeof m.id !== "string") return;
    if (m.type === "pending") {
      this.#addPending(m.id, m.key, m.patch);
      // If that tab closes before its answer, its change must not stay shown here forever.
      setTimeout(() => this.#applySettled(m.id, m.key), REMOTE_PENDING_MS);
    } else if (m.type === "settled") {
      this.#applySettled(m.id, m.key, m.notification, m.removed);
    }
  }

  // -- plumbing ---------------------------------------------------------------------------------

  #subscriptionKey() {
    return `herald.subscription.${this.#session.clientId}.${this.user}`;
  }

  #subscriptionPath() {
    return `/me/notificationSubscriptions/${encodeURIComponent(this.#subscription.id)}`;
  }

  /**
   * A Graph request with the session's token; one 401 renews the token and tries again. No
   * `X-UNS-ID`: the other tabs share this subscription and must get this tab's changes over
   * their own streams.
   */
  async #request(method, path, body) {
    let url = path.startsWith("/") ? this.#base + path : path;
    if (/^https?:/.test(path) && this.#base.startsWith("/")) {
      const link = new URL(path); // server links carry its configured base URL: stay on ours
      url = link.pathname + link.search;
    }
    let token = await this.#session.token();
    for (let attempt = 0; ; attempt++) {
      const headers = { Authorization: `Bearer ${token}` };
      if (body !== undefined) headers["Content-Type"] = "application/json";
      let res;
      try {
        res = await fetch(url, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          cache: "no-store",
        });
      } catch (e) {
        throw new NetworkError(`${method} ${url} failed: ${e.message}`, { cause: e });
      }
      if (res.status === 401 && attempt === 0) {
        token = await this.#session.renew(token);
        continue;
      }
      if (!res.ok) throw await HttpError.from(res);
      return res.status === 204 ? null : res.json();
    }
  }

  #setStatus(state, retryAt) {
    if (state === this.#state && retryAt === undefined && this.#retryAt === undefined) return;
    this.#state = state;
    this.#retryAt = retryAt;
    const detail = retryAt === undefined ? { state } : { state, retryAt };
    this.dispatchEvent(new CustomEvent("status", { detail }));
  }

  #expire(error) {
    this.#halt(error ?? new SessionExpired());
    this.#setStatus(error?.signedOut ? "signed-out" : "expired");
  }
}
