// The page's token: taken from the URL fragment (#token=, never sent to a server) or pasted, kept
// in sessionStorage for this tab only, and never put in a query string or a log.
const KEY = "testpulse.token";
const listeners = new Set();

export function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (!token) return false;
  params.delete("token");
  const rest = params.toString();
  // Drop it from the address bar and the history entry, so it is not copied along with the URL.
  history.replaceState(history.state, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  setToken(token);
  return true;
}

export function currentToken() {
  try {
    return sessionStorage.getItem(KEY);
  } catch {
    return null;
  }
}

export function setToken(token) {
  const cleaned = String(token || "").trim();
  if (!cleaned) return;
  sessionStorage.setItem(KEY, cleaned);
  for (const listener of listeners) listener(cleaned);
}

export function forgetToken() {
  sessionStorage.removeItem(KEY);
  for (const listener of listeners) listener(null);
}

export function onTokenChange(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

// The claims are read only to choose what to show (the controls); the server decides what is allowed.
export function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
  } catch {
    return {};
  }
}

export function mayControl(token) {
  const role = claims(token || "").role;
  return role === "operator" || role === "admin";
}
