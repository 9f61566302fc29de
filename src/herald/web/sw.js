// The inbox's service worker (scope /inbox/, docs/inbox.md step 9): shows Herald's Web Push
// messages (docs/push.md "The message") and opens the inbox when one is clicked.

const ICON = "/inbox/icon.svg";

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("push", (event) => event.waitUntil(show(event.data)));

/**
 * The app whose desktop notifications these are, `{clientId, application}`, stored by the page
 * when they were turned on: a message without a title names the app, and a click opens that
 * app's inbox.
 */
async function pushApp() {
  try {
    const cache = await caches.open("herald-inbox");
    const app = JSON.parse((await (await cache.match("/inbox/push-app"))?.text()) || "{}");
    return {
      clientId: typeof app?.clientId === "string" ? app.clientId : "",
      application: typeof app?.application === "string" ? app.application : "",
    };
  } catch {
    return { clientId: "", application: "" };
  }
}

async function show(data) {
  let m = {};
  try {
    m = data?.json() ?? {};
  } catch {
    // not JSON: still show something, browsers require a notification for every push
  }
  const app = (await pushApp()).application;
  const visual = (m.type === "alert" || m.type === "fallback") && m.title;
  // A truncated message (or one with only raw content) lost its title: fetch-free shoulder tap.
  const title = visual ? m.title : m.type === "alert" || m.type === "fallback" ? "New notification" : app || "Inbox";
  const body = visual ? (m.body ?? "") : m.type === "alert" || m.type === "fallback" ? app : "Something changed in your inbox.";
  const id = typeof m.id === "string" ? m.id : "";
  await self.registration.showNotification(title, {
    body,
    tag: id || "herald",
    icon: ICON,
    data: { id },
    timestamp: Date.now(),
  });
}

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  event.waitUntil(open(event.notification.data?.id ?? ""));
});

async function open(id) {
  const scope = self.registration.scope; // e.g. https://herald.example/inbox/
  const { clientId } = await pushApp();
  const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
  // Only an inbox of the app these notifications are for (its URL names it with ?app=).
  const appOf = (url) => new URL(url).searchParams.get("app");
  const inboxes = windows.filter((c) => c.url.startsWith(scope) && (!clientId || appOf(c.url) === clientId));
  const inbox = inboxes.find((c) => c.focused) ?? inboxes.find((c) => c.visibilityState === "visible") ?? inboxes[0];
  if (inbox) {
    try {
      await inbox.focus();
    } catch {
      // focusing needs a user activation the browser may not grant: the message still goes
    }
    if (id) inbox.postMessage({ type: "activate", id, clientId });
    return;
  }
  const query = new URLSearchParams();
  if (clientId) query.set("app", clientId);
  if (id) query.set("activate", id);
  await self.clients.openWindow(`/inbox/${query.size ? `?${query}` : ""}`);
}
