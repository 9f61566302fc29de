// The inbox page (docs/inbox.md): sign-in, the feed, desktop notifications. Everything that
// talks to Herald is in herald.js; this file only renders and wires the page.

import { HeraldClient, LinkSession, NetworkError, OidcSession, fromBase64url } from "./herald.js";

const $ = (id) => document.getElementById(id);
const PUSH_TIMEOUT_MS = 20_000;
const STATUS_TEXT = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  expired: "Session expired",
  "signed-out": "Signed out",
};
const PUSH_TEXT = {
  unsupported: "This browser can't show desktop notifications.",
  default: "Desktop notifications are off.",
  denied: "Desktop notifications are blocked for this site in the browser's settings.",
  subscribing: "Turning on desktop notifications…",
  subscribed: "Desktop notifications are on.",
  unavailable:
    "Desktop notifications are unavailable: the browser could not reach its push service. " +
    "New notifications still appear here live.",
};
const FAILED = {
  read: "Could not mark it as read",
  unread: "Could not mark it as unread",
  dismiss: "Could not dismiss it",
  delete: "Could not delete it",
  activate: "Could not open it",
};
const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: "short" });
const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const fullTime = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });
const retryTime = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });

let config = { signIn: "none" };
let session = null;
let client = null;
let loaded = false; // the feed has been synced once
let activateId = new URL(location.href).searchParams.get("activate");
let alertKind = null;
let worker = null; // the service worker registration, once registered
let itemSeq = 0;
const pushSupported =
  window.isSecureContext &&
  "serviceWorker" in navigator &&
  "PushManager" in window &&
  "Notification" in window;

// -- small DOM helpers ---------------------------------------------------------------------------

function code(text) {
  const el = document.createElement("code");
  el.textContent = text;
  return el;
}

function para(...parts) {
  const p = document.createElement("p");
  p.append(...parts);
  return p;
}

function showAlert(kind, ...paragraphs) {
  alertKind = kind;
  const alert = $("alert");
  alert.replaceChildren(...paragraphs);
  if (kind === "error") {
    const close = document.createElement("button");
    close.type = "button";
    close.className = "link";
    close.textContent = "Hide message";
    close.addEventListener("click", clearAlert);
    alert.lastElementChild.append(" ", close);
  }
}

function clearAlert() {
  alertKind = null;
  $("alert").replaceChildren();
}

function describe(error) {
  if (error instanceof NetworkError) return "Herald can't be reached right now.";
  if (error?.name === "SessionExpired") {
    return error.signedOut ? "you are signed out." : "your session has expired.";
  }
  return error?.message || String(error);
}

function signinCommand(user) {
  const command = code(`herald signin --app ${session?.clientId || "<clientId>"} --user ${user || "<you>"}`);
  command.className = "command";
  return command;
}

// -- status and sign-in states -------------------------------------------------------------------

function setConnection(state, retryAt) {
  const el = $("connection");
  el.dataset.state = state;
  let text = STATUS_TEXT[state] ?? state;
  if (state === "reconnecting" && retryAt) {
    text += ` Next attempt at ${retryTime.format(retryAt)}.`;
  }
  el.textContent = text;
  $("retry").hidden = !(state === "reconnecting" && retryAt);
}

function showSignedOut({ expired = false } = {}) {
  setConnection(expired ? "expired" : "signed-out");
  $("inbox").hidden = true;
  $("signin").hidden = false;
  $("signin-title").textContent = expired ? "Sign in again" : "Sign in";
  const text = $("signin-text");
  const user = expired ? session?.user : null;
  if (config.signIn === "link") {
    text.replaceChildren(
      para("Ask for a sign-in link: ", signinCommand(user)),
      para(
        "Whoever runs this Herald server can create one. Open it in this browser: " +
          "it works once, for a few minutes.",
      ),
    );
  } else if (config.signIn === "oidc") {
    text.replaceChildren(para("Sign in to see your notifications."));
    $("sign-in").hidden = false;
  } else {
    text.replaceChildren(
      para("Sign-in isn't configured on this Herald server, so the inbox can't show anything."),
      para(
        "Its operator can turn on the embedded issuer (sign-in links) or an OpenID Connect " +
          "provider (",
        code("inbox_issuer"),
        ").",
      ),
    );
  }
}

function showExpired() {
  const how =
    config.signIn === "oidc"
      ? para("Sign in again with the button below.")
      : para("To sign in again, ask for a new sign-in link: ", signinCommand(session?.user));
  showAlert("expired", para("Your session has expired."), how);
  showSignedOut({ expired: true });
}

function onStatus({ state, retryAt }) {
  setConnection(state, retryAt);
  if (state === "live" && alertKind === "error") clearAlert();
  if (state === "expired") showExpired();
  if (state === "signed-out") showSignedOut();
}

// -- the feed ------------------------------------------------------------------------------------

let renderQueued = false;

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  queueMicrotask(() => {
    renderQueued = false;
    render();
  });
}

function when(iso) {
  const d = new Date(iso);
  return (d.toDateString() === new Date().toDateString() ? timeOnly : dateTime).format(d);
}

function createItem(id) {
  const li = $("item-template").content.firstElementChild.cloneNode(true);
  const titleId = `item-${++itemSeq}-title`;
  li.dataset.id = id;
  li.tabIndex = -1;
  li.querySelector(".title").id = titleId;
  for (const button of li.querySelectorAll("button")) {
    button.setAttribute("aria-describedby", titleId);
  }
  return li;
}

function updateItem(li, n) {
  li.dataset.readState = n.readState;
  li.dataset.actionState = n.userActionState;
  // Raw content is data for the app, not text for people: it is never shown.
  const visual = n.payload?.visualContent;
  li.querySelector(".title").textContent = visual?.title || "Notification";
  const body = li.querySelector(".body");
  body.textContent = visual?.body ?? "";
  body.hidden = !visual?.body;
  // Graph makes visual notifications High by default, so only Low is worth a mark.
  li.querySelector(".priority-badge").hidden = n.priority !== "Low";
  const action = li.querySelector(".action-badge");
  const label = { activated: "Opened", snoozed: "Snoozed" }[n.userActionState];
  action.hidden = !label;
  action.textContent = label ?? "";
  const group = li.querySelector(".group");
  group.hidden = !n.groupName;
  group.replaceChildren();
  if (n.groupName) {
    const prefix = document.createElement("span");
    prefix.className = "visually-hidden";
    prefix.textContent = "Group: ";
    group.append(prefix, n.groupName);
  }
  const time = li.querySelector("time");
  time.dateTime = n.createdDateTime;
  time.textContent = when(n.createdDateTime);
  time.title = fullTime.format(new Date(n.createdDateTime));
  const read = li.querySelector('[data-action="read"]');
  read.textContent = n.readState === "unread" ? "Mark as read" : "Mark as unread";
}

function render() {
  const feed = $("feed");
  const items = client ? client.notifications().filter((n) => n.userActionState !== "dismissed") : [];
  const wanted = new Set(items.map((n) => n.id));
  const focused = document.activeElement;
  const focusedItem = feed.contains(focused) ? focused.closest("li") : null;
  const focusedIndex = focusedItem ? [...feed.children].indexOf(focusedItem) : -1;

  const existing = new Map();
  for (const li of [...feed.children]) {
    if (wanted.has(li.dataset.id)) existing.set(li.dataset.id, li);
    else li.remove(); // first, so that ordering below never moves a kept (maybe focused) item
  }
  let cursor = feed.firstElementChild;
  for (const n of items) {
    const li = existing.get(n.id) ?? createItem(n.id);
    // Only what changed is rewritten: rewriting every item made each message cost style and
    // layout of the whole feed (benchmarks/inbox.py).
    const version = `${n["@odata.etag"] ?? n.lastModifiedDateTime}|${n.readState}|${n.userActionState}`;
    if (li.dataset.version !== version) {
      updateItem(li, n);
      li.dataset.version = version;
    }
    if (li === cursor) cursor = cursor.nextElementSibling;
    else feed.insertBefore(li, cursor);
  }

  if (focusedItem && !focusedItem.isConnected) {
    // The focused notification went away (dismissed, deleted): keep focus nearby, on the next
    // item's first button, never on the same action (Enter pressed again must not delete on).
    const next = feed.children[Math.min(focusedIndex, feed.children.length - 1)];
    const target = next?.querySelector("button") ?? next ?? $("empty");
    target.focus();
  }

  const unread = items.filter((n) => n.readState === "unread").length;
  $("loading").hidden = loaded;
  $("empty").hidden = !loaded || items.length > 0;
  const count = `${items.length} notification${items.length === 1 ? "" : "s"}`;
  $("summary").textContent = !loaded || items.length === 0
    ? ""
    : `${count}, ${unread ? `${unread} unread` : "all read"}`;
}

async function act(action, id) {
  try {
    if (action === "read") await client.markRead(id);
    else if (action === "unread") await client.markUnread(id);
    else if (action === "dismiss") await client.dismiss(id);
    else if (action === "delete") await client.remove(id);
    else if (action === "activate") await client.activate(id);
  } catch (error) {
    showAlert("error", para(`${FAILED[action]}: ${describe(error)}`));
  }
}

function onFeedClick(event) {
  const button = event.target.closest("button[data-action]");
  const li = button?.closest("li[data-id]");
  if (!li || !client) return;
  let action = button.dataset.action;
  if (action === "read" && li.dataset.readState === "read") action = "unread";
  act(action, li.dataset.id);
}

async function activate(id) {
  await act("activate", id);
  const li = [...$("feed").children].find((el) => el.dataset.id === id);
  if (li) {
    li.scrollIntoView({ block: "nearest" });
    li.focus();
    li.classList.add("flash");
    setTimeout(() => li.classList.remove("flash"), 2000);
  }
}

// -- desktop notifications -----------------------------------------------------------------------

function setPush(state, text) {
  const el = $("push-state");
  el.dataset.state = state;
  el.textContent = text ?? PUSH_TEXT[state];
  const enable = $("enable-push");
  enable.hidden = !["default", "unavailable", "subscribing"].includes(state);
  enable.disabled = state === "subscribing";
  $("disable-push").hidden = state !== "subscribed";
}

function registerWorker() {
  worker ??= navigator.serviceWorker.register("/inbox/sw.js", { scope: "/inbox/" }).catch((e) => {
    worker = null;
    throw e;
  });
  return worker;
}

function appInfo() {
  if (client.applicationServerKey) {
    return Promise.resolve({ application: client.application, applicationServerKey: client.applicationServerKey });
  }
  return new Promise((resolve) => client.addEventListener("app", (e) => resolve(e.detail), { once: true }));
}

function sameKey(subscription, key) {
  const current = subscription.options?.applicationServerKey;
  if (!current) return true;
  const a = new Uint8Array(current);
  const b = fromBase64url(key);
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

function withTimeout(promise, ms) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error("timed out")), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Who turned desktop notifications on for this app in this browser: the push channel is sent
// again automatically only for that user (never for whoever a sign-in link signed in).
function pushOwnerKey() {
  return `herald.push.${session.clientId}`;
}

async function initPush() {
  if (!pushSupported) return setPush("unsupported");
  if (Notification.permission === "denied") return setPush("denied");
  if (Notification.permission !== "granted") return setPush("default");
  setPush("default");
  try {
    const registration = await registerWorker();
    const sub = await registration.pushManager.getSubscription();
    const { application, applicationServerKey } = await appInfo();
    if (!sub || !sameKey(sub, applicationServerKey)) return; // none, or another app's
    if (localStorage.getItem(pushOwnerKey()) !== session.user) return; // another user's
    setPush("subscribed");
    rememberPushApp(application);
    await client.setPushChannel(sub.toJSON());
  } catch (error) {
    if (!["connecting", "live", "reconnecting"].includes(client.state)) return; // ended meanwhile
    setPush("unavailable", `Desktop notifications are unavailable: ${describe(error)}`);
  }
}

async function enablePush() {
  setPush("subscribing");
  const owner = session.user;
  let permission;
  try {
    permission = await Notification.requestPermission();
  } catch {
    permission = Notification.permission;
  }
  if (permission !== "granted") return setPush(permission === "denied" ? "denied" : "default");
  let key;
  const subscribing = (async () => {
    await registerWorker();
    ({ applicationServerKey: key } = await appInfo());
    const registration = await navigator.serviceWorker.ready;
    const old = await registration.pushManager.getSubscription();
    if (old && !sameKey(old, key)) await old.unsubscribe(); // one push subscription per scope
    return registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: fromBase64url(key) });
  })();
  let sub;
  try {
    sub = await withTimeout(subscribing, PUSH_TIMEOUT_MS);
  } catch {
    setPush("unavailable");
    // A push service that answers after all still gets the channel registered.
    subscribing.then((late) => $("push-state").dataset.state === "unavailable" && finishPush(late, owner), () => {});
    return;
  }
  await finishPush(sub, owner);
}

async function finishPush(sub, owner) {
  try {
    if (session.user !== owner || !session.signedIn) return; // signed out or switched meanwhile
    await client.setPushChannel(sub.toJSON());
    localStorage.setItem(pushOwnerKey(), owner);
    rememberPushApp(client.application);
    setPush("subscribed");
  } catch (error) {
    setPush("unavailable", `Herald did not take this browser's push channel: ${describe(error)}`);
  }
}

async function disablePush() {
  try {
    await client.setPushChannel(null);
    localStorage.removeItem(pushOwnerKey());
    const registration = await navigator.serviceWorker.getRegistration("/inbox/");
    await (await registration?.pushManager.getSubscription())?.unsubscribe();
    setPush("default");
  } catch (error) {
    showAlert("error", para(`Could not turn off desktop notifications: ${describe(error)}`));
  }
}

// Desktop notifications of what has been dealt with here (or on another device) are closed.
const toClose = new Set();

function closeDesktop({ id, notification: n }) {
  if (!pushSupported || Notification.permission !== "granted") return;
  if (n && n.readState === "unread" && n.userActionState !== "dismissed") return;
  if (toClose.size === 0) setTimeout(flushClose, 0);
  toClose.add(id);
}

async function flushClose() {
  const ids = new Set(toClose);
  toClose.clear();
  try {
    const registration = await navigator.serviceWorker.getRegistration("/inbox/");
    for (const shown of (await registration?.getNotifications()) ?? []) {
      if (ids.has(shown.tag)) shown.close();
    }
  } catch {
    // nothing shown, or no worker
  }
}

/**
 * Signing out (HeraldClient#signOut's cleanup): this browser's push subscription goes too, if it
 * is this app's (one push subscription per scope: it may be another app's).
 */
async function unsubscribePush() {
  const owned = localStorage.getItem(pushOwnerKey()) !== null;
  localStorage.removeItem(pushOwnerKey());
  if (!pushSupported) return;
  const registration = await navigator.serviceWorker.getRegistration("/inbox/");
  const sub = await registration?.pushManager.getSubscription();
  const key = client?.applicationServerKey;
  if (sub && (key ? sameKey(sub, key) : owned)) await sub.unsubscribe();
  setPush(Notification.permission === "denied" ? "denied" : "default");
}

function onWorkerMessage(event) {
  const m = event.data;
  if (m?.type !== "activate" || typeof m.id !== "string") return;
  if (m.clientId && m.clientId !== session?.clientId) return; // another app's notification
  if (loaded) activate(m.id);
  else activateId = m.id;
}

async function rememberPushApp(application) {
  // The app that has the desktop notifications, for the service worker: it names the app on a
  // push that lost its title (docs/push.md), and a click opens that app's inbox.
  try {
    const cache = await caches.open("herald-inbox");
    await cache.put("/inbox/push-app", new Response(JSON.stringify({ clientId: session.clientId, application })));
  } catch {
    // no Cache Storage (insecure context): the worker shows a generic title
  }
}

// -- start ---------------------------------------------------------------------------------------

function startClient() {
  client = new HeraldClient({ baseUrl: "/beta", session });
  client.addEventListener("status", (e) => onStatus(e.detail));
  client.addEventListener("change", (e) => {
    scheduleRender();
    closeDesktop(e.detail);
  });
  client.addEventListener("app", ({ detail }) => {
    document.title = `Inbox — ${detail.application}`;
    $("app-name").textContent = detail.application;
    $("app-name").hidden = false;
  });
  client.addEventListener("error", (e) => showAlert("error", para(`Herald answered: ${describe(e.detail.error)}`)));
  $("signin").hidden = true;
  $("inbox").hidden = false;
  $("who").textContent = `Signed in as ${session.user}`;
  if (pushSupported) {
    navigator.serviceWorker.addEventListener("message", onWorkerMessage);
    navigator.serviceWorker.startMessages();
  }
  client.start().then(
    () => {
      loaded = true;
      render();
      if (activateId) {
        const id = activateId;
        activateId = null;
        activate(id);
      }
    },
    () => {}, // expired or stopped: the status event shows it
  );
  initPush();
}

// -- notification settings (docs/inbox.md) -------------------------------------------------------

function localZone() {
  return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
}

function showSettings(p) {
  $("muted-groups").value = (p.mutedGroups ?? []).join(", ");
  for (const box of document.getElementsByName("muted-platform")) {
    box.checked = (p.mutedPlatforms ?? []).includes(box.value);
  }
  const q = p.quietHours;
  $("quiet-enabled").checked = Boolean(q);
  $("quiet-start").value = q ? q.startTime.slice(0, 5) : "22:00";
  $("quiet-end").value = q ? q.endTime.slice(0, 5) : "07:00";
  $("quiet-zone").value = q ? q.timeZone : localZone();
  $("quiet-high").checked = Boolean(q?.allowHighPriority);
  const state = $("settings-state");
  state.dataset.state = "loaded";
  state.textContent = "";
}

function settingsPatch() {
  const groups = $("muted-groups").value.split(",").map((g) => g.trim()).filter(Boolean);
  const platforms = [...document.getElementsByName("muted-platform")]
    .filter((box) => box.checked)
    .map((box) => box.value);
  const quiet = $("quiet-enabled").checked
    ? {
        timeZone: $("quiet-zone").value.trim(),
        startTime: $("quiet-start").value,
        endTime: $("quiet-end").value,
        allowHighPriority: $("quiet-high").checked,
      }
    : null;
  return { mutedGroups: groups, mutedPlatforms: platforms, quietHours: quiet };
}

function settingsState(state, text) {
  const el = $("settings-state");
  el.dataset.state = state;
  el.textContent = text;
}

async function loadSettings() {
  if (!$("settings").open || !client) return;
  settingsState("loading", "Loading…");
  try {
    showSettings(await client.preferences());
  } catch (error) {
    settingsState("error", `Could not load your settings: ${describe(error)}`);
  }
}

async function saveSettings(event) {
  event.preventDefault();
  const button = $("save-settings");
  button.disabled = true;
  settingsState("saving", "Saving…");
  try {
    showSettings(await client.setPreferences(settingsPatch()));
    settingsState("saved", "Saved.");
  } catch (error) {
    settingsState("error", `Not saved: ${describe(error)}`);
  } finally {
    button.disabled = false;
  }
}

function signInFailed(error) {
  const what = {
    invalid_grant: "This sign-in link has expired or has already been used.",
    unreachable: "Herald could not be reached to finish signing in. Reload the page to try again.",
    slow_down: "Herald is busy. Reload the page in a moment to finish signing in.",
  }[error.code] ?? `Signing in did not work: ${describe(error)}`;
  const next = session.signedIn
    ? para(`You are still signed in as ${session.user}.`)
    : para("Ask for a new one: ", signinCommand());
  showAlert("signin", para(what), next);
}

/**
 * A sign-in link for another user than the one signed in (maybe sent by someone else to take
 * over this browser): ask in the page before switching; switching signs the current user out
 * properly first (their subscription and desktop notifications go).
 */
function askSwitch({ code, user }) {
  const current = session.user;
  const next = user ?? "another user";
  const panel = $("switch-user");
  $("switch-text").replaceChildren(
    para("This sign-in link is for ", strong(next), ", but you are signed in as ", strong(current), "."),
    para("Only switch if you asked for this link yourself."),
  );
  const yes = $("switch-yes");
  const no = $("switch-no");
  yes.textContent = `Switch to ${next}`;
  no.textContent = `Stay signed in as ${current}`;
  const close = () => {
    panel.hidden = true;
    yes.onclick = no.onclick = null;
  };
  no.onclick = () => {
    session.discardSignIn();
    close();
  };
  yes.onclick = async () => {
    close();
    await client?.signOut({ cleanup: unsubscribePush });
    try {
      await session.signIn(code);
    } catch (error) {
      signInFailed(error);
      return;
    }
    location.reload();
  };
  panel.hidden = false;
  $("switch-title").focus();
}

function strong(text) {
  const el = document.createElement("strong");
  el.textContent = text;
  return el;
}

async function signIn() {
  if (config.signIn === "link") {
    session = LinkSession.fromLocation();
    if (session.invalidApp) {
      showAlert("signin", para("This link names no valid app."), para("Ask for a new one: ", signinCommand()));
    }
    try {
      await session.ready;
    } catch (error) {
      if (!session.invalidApp) signInFailed(error);
    }
  } else if (config.signIn === "oidc") {
    session = await OidcSession.load(config);
    $("sign-in").addEventListener("click", () =>
      session.begin().catch((error) => showAlert("signin", para(`Could not start signing in: ${describe(error)}`))));
    try {
      await session.complete();
    } catch (error) {
      showAlert("signin", para(`Signing in did not work: ${describe(error)}`));
    }
  }
  // A sign-in (or another user's) in another tab: start over with it.
  session?.addEventListener("signedin", () => location.reload());
}

/**
 * How this Herald signs people in. Kept in localStorage too, so that a page loaded while Herald
 * is restarting still starts (the client then reconnects); with nothing kept, ask until it
 * answers.
 */
async function loadConfig() {
  const KEY = "herald.config";
  for (let attempt = 0; ; attempt++) {
    try {
      const res = await fetch("/inbox/config.json", { cache: "no-store" });
      if (res.ok) {
        const fetched = await res.json();
        localStorage.setItem(KEY, JSON.stringify(fetched));
        return fetched;
      }
    } catch {
      // unreachable: below
    }
    try {
      const kept = JSON.parse(localStorage.getItem(KEY));
      if (kept?.signIn) return kept;
    } catch {
      // nothing usable kept
    }
    const wait = Math.min(30_000, 1000 * 2 ** attempt) * (0.75 + Math.random() * 0.5);
    setConnection("reconnecting", Date.now() + wait);
    await new Promise((resolve) => {
      setTimeout(resolve, wait);
      $("retry").onclick = resolve;
    });
    $("retry").onclick = null;
    setConnection("reconnecting");
  }
}

async function main() {
  // A sign-in link opened in a tab already at /inbox/?app=… only changes the fragment: no load.
  window.addEventListener("hashchange", () => {
    if (new URLSearchParams(location.hash.slice(1)).has("signin")) location.reload();
  });
  $("feed").addEventListener("click", onFeedClick);
  $("retry").addEventListener("click", () => client?.reconnect());
  $("enable-push").addEventListener("click", enablePush);
  $("disable-push").addEventListener("click", disablePush);
  $("settings").addEventListener("toggle", loadSettings);
  $("settings-form").addEventListener("submit", saveSettings);
  $("sign-out").addEventListener("click", async () => {
    $("switch-user").hidden = true;
    const signingOut = client?.signOut({ cleanup: unsubscribePush });
    showSignedOut();
    await signingOut;
  });
  config = await loadConfig();
  await signIn();
  if (activateId) {
    // Handled once started; a reload must not do it again.
    const url = new URL(location.href);
    url.searchParams.delete("activate");
    history.replaceState(history.state, "", url.pathname + url.search + url.hash);
  }
  if (session?.signedIn) {
    startClient();
    if (session.pendingSignIn) askSwitch(session.pendingSignIn);
  } else showSignedOut();
}

main().catch((error) => showAlert("error", para(`The inbox could not start: ${describe(error)}`)));
