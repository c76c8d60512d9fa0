// The REST API as the console uses it: the key from sessionStorage in an Authorization header on every call,
// errors as ApiError {status, message}, server-sent events read from fetch(), media shown through blob URLs
// (a key never goes into a URL, so it is never in a src attribute, a log or a history entry).

const KEY_ITEM = "tubescope.key";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function savedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function saveKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

// Signing out forgets everything this tab kept: the key, the jobs it follows, the media it fetched.
export function forgetKey() {
  sessionStorage.clear();
  for (const url of mediaCache.values()) URL.revokeObjectURL(url);
  mediaCache.clear();
}

function headers(extra = {}) {
  const key = savedKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") message = body.error;
  } catch {
    // not JSON (a proxy's page): keep the status line
  }
  return new ApiError(response.status, message);
}

// fetch with the key; throws ApiError for any answer that is not 2xx.
export async function send(method, path, body, options = {}) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
                 signal: options.signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the service did not answer (${e.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJson(path, options) {
  return (await send("GET", path, undefined, options)).json();
}

export async function postJson(path, body, options) {
  return (await send("POST", path, body, options)).json();
}

export async function remove(path) {
  return (await send("DELETE", path)).json();
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") q.set(name, String(value));
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}

export function sourcePath(sourceId) {
  return `/v1/sources/${encodeURIComponent(sourceId)}`;
}

// Server-sent events of a fetch() response: calls onEvent(name, data) per event, data parsed from JSON.
export async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      dispatch(block, onEvent);
    }
  }
  if (buffer.trim()) dispatch(buffer, onEvent);
}

function dispatch(block, onEvent) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (data.length) onEvent(name, JSON.parse(data.join("\n")));
}

// A thumbnail (content never changes for a URL): one blob URL per URL while signed in.
const mediaCache = new Map();

export async function imageUrl(path) {
  if (!mediaCache.has(path)) {
    const blob = await (await send("GET", path)).blob();
    mediaCache.set(path, URL.createObjectURL(blob));
  }
  return mediaCache.get(path);
}

// A clip of a source: {url (a blob URL the caller revokes), start, end} with the times it really covers.
export async function clip(sourceId, start, end) {
  const response = await send("GET", `${sourcePath(sourceId)}/clip${query({ start, end })}`);
  const blob = await response.blob();
  const covered = (name, fallback) => {
    const value = Number.parseFloat(response.headers.get(name));
    return Number.isFinite(value) ? value : fallback;
  };
  return { url: URL.createObjectURL(blob), start: covered("X-Clip-Start", start), end: covered("X-Clip-End", end) };
}
