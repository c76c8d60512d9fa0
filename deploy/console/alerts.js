// Standing alerts: create (admin), list, delete (admin), recent hits, and new hits live from the SSE stream.
import { getJson, postJson, query, readEvents, remove, send } from "./api.js";
import { $, el, every, showError, showNote, thumbnail, when } from "./ui.js";

const POLL_MS = 10000;
const RECENT_HITS = 20;
const RECONNECT_MS = 3000;

// A listing as a bare array or wrapped in {name: [...]}
function listed(body, name) {
  return Array.isArray(body) ? body : (body[name] ?? []);
}

export function alertsPanel(root, session) {
  const form = $("#alert-form", root);
  const status = $(".status", root);
  const list = $("#alert-list", root);
  const hits = $("#alert-hits", root);
  const live = $("#alert-live", root);

  async function refresh() {
    try {
      const alerts = listed(await getJson("/v1/alerts"), "alerts");
      list.replaceChildren(...alerts.map(alertRow));
      const recent = listed(await getJson(`/v1/alerts/hits${query({ limit: RECENT_HITS })}`), "hits");
      hits.replaceChildren(...recent.map(hitItem));
    } catch (error) {
      showError(status, error);
    }
  }

  function alertRow(alert) {
    const del = el("button", { type: "button", disabled: !session.admin }, "Delete");
    del.addEventListener("click", async () => {
      try {
        await remove(`/v1/alerts/${encodeURIComponent(alert.alert_id)}`);
        showNote(status, `Deleted alert ${alert.alert_id}`);
        await refresh();
      } catch (error) {
        showError(status, error);
      }
    });
    return el("tr", { dataset: { alert: alert.alert_id } },
      el("th", { scope: "row" }, alert.query), el("td", {}, (alert.sources ?? []).join(", ")),
      el("td", {}, alert.threshold ?? ""), el("td", {}, alert.cooldown_seconds ?? ""),
      el("td", {}, alert.webhook ?? ""), el("td", {}, del));
  }

  function hitItem(hit) {
    return el("li", { class: "hit", dataset: { alert: hit.alert_id, segment: hit.segment_id } },
      thumbnail(hit.thumbnail_url, `${hit.source_id} at ${when(hit)}`),
      el("div", {}, el("strong", {}, hit.query), ` · ${hit.source_id} ${when(hit)}`,
         ` · score ${Number(hit.score).toFixed(3)}`, hit.caption ? el("p", { class: "caption" }, hit.caption) : null));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const number = (id) => ($(id, root).value === "" ? undefined : Number($(id, root).value));
    const body = { query: $("#alert-query", root).value,
                   sources: $("#alert-sources", root).value.split(",").map((s) => s.trim()).filter(Boolean),
                   threshold: number("#alert-threshold"), cooldown_seconds: number("#alert-cooldown"),
                   webhook: $("#alert-webhook", root).value || undefined };
    try {
      const created = await postJson("/v1/alerts", body);
      showNote(status, `Created alert ${created.alert_id}`);
      form.reset();
      await refresh();
    } catch (error) {
      showError(status, error);
    }
  });

  // New hits as they happen; reconnects after a dropped stream while the console is signed in.
  function follow() {
    const controller = new AbortController();
    let stopped = false;
    (async () => {
      while (!stopped) {
        try {
          const response = await send("GET", "/v1/alerts/hits/stream", undefined, { signal: controller.signal });
          showNote(live, "Live: new hits appear as they happen");
          await readEvents(response, (name, hit) => {
            if (name === "hit") hits.prepend(hitItem(hit));
          });
        } catch (error) {
          if (stopped) return;
          if (error.status === 404 || error.status === 403) {   // no alerts here, or not for this key
            showError(live, error);
            return;
          }
          showNote(live, "Live updates reconnecting…");
        }
        await new Promise((resolve) => { setTimeout(resolve, RECONNECT_MS); });
      }
    })();
    return () => { stopped = true; controller.abort(); };
  }

  return {
    start: () => {
      const stopPolling = every(POLL_MS, refresh);
      const stopFollowing = follow();
      return () => { stopPolling(); stopFollowing(); };
    },
  };
}
