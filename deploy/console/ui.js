// Small DOM helpers shared by the panels: building elements, showing errors and notes, times and thumbnails.
import { imageUrl } from "./api.js";

// el("li", {class: "x", dataset: {id: 1}, onclick: f}, "text", child): an element with attributes and children.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

// What an error says to a person: scope errors (403) and invalid input (422) name what the server said.
export function describe(error) {
  switch (error.status) {
    case 401: return `Not signed in: ${error.message}`;
    case 403: return `Not allowed with this key: ${error.message}`;
    case 404: return `Not found: ${error.message}`;
    case 409: return `Conflict: ${error.message}`;
    case 422: return `Invalid input: ${error.message}`;
    case 503: return `Service busy or unavailable: ${error.message}`;
    default: return error.message || String(error);
  }
}

// The status line of a panel (an element with role=status or role=alert): an error or a note, or nothing.
export function showError(target, error) {
  target.textContent = describe(error);
  target.dataset.status = String(error.status ?? "");
  target.classList.add("error");
  target.hidden = false;
}

export function showNote(target, text) {
  target.textContent = text;
  delete target.dataset.status;
  target.classList.remove("error");
  target.hidden = !text;
}

export function seconds(value) {
  return `${Number(value).toFixed(1)} s`;
}

// A row's time as the API wrote it ("start": ISO 8601 or m:ss), or its seconds.
export function when(row) {
  return row.start ?? seconds(row.t0);
}

export function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let value = Number(n);
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024;
    i += 1;
  }
  return `${value.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// A thumbnail_url shown as an <img> once its blob has been fetched with the key; a placeholder until then, or for
// good when the row has none.
export function thumbnail(url, alt) {
  const placeholder = el("span", { class: "thumb none", role: "img", "aria-label": `${alt} (no thumbnail)` });
  if (url) {
    imageUrl(url)
      .then((src) => placeholder.replaceWith(el("img", { class: "thumb", src, alt, width: 160, height: 90 })))
      .catch(() => { /* the placeholder stays */ });
  }
  return placeholder;
}

// Runs fn now and every `ms` while the document is visible; returns a function that stops it.
export function every(ms, fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try { await fn(); } catch { /* each panel reports its own errors */ }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}
