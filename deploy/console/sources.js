// Sources and feeds with live status (polled), and a timeline of thumbnails per source.
import { getJson, query, sourcePath } from "./api.js";
import { clipPlayer } from "./player.js";
import { $, bytes, el, every, showError, showNote, thumbnail, when } from "./ui.js";

const POLL_MS = 5000;
const TIMELINE_SHOWN = 48;        // the latest segments of a window; narrow the window to see older ones

export function sourcesPanel(root, session) {
  const status = $(".status", root);
  const sourceList = $("#source-list", root);
  const feedList = $("#feed-list", root);
  const timeline = $("#timeline", root);
  const form = $("#timeline-form", root);
  const select = $("#timeline-source", root);

  async function refresh() {
    try {
      const [{ sources }, { feeds }] = await Promise.all([getJson("/v1/sources"), getJson("/v1/feeds")]);
      session.sources = sources.map((s) => s.source_id);
      session.emit("sources");
      sourceList.replaceChildren(...sources.map((s) => el("tr", { dataset: { source: s.source_id } },
        el("th", { scope: "row" }, s.source_id), el("td", {}, s.segments), el("td", {}, bytes(s.bytes)),
        el("td", {}, el("button", { type: "button", onclick: () => showTimeline(s.source_id) }, "Timeline")))));
      feedList.replaceChildren(...await Promise.all(feeds.map(feedRow)));
      root.dataset.loaded = "true";
      showNote(status, "");
    } catch (error) {
      showError(status, error);
    }
  }

  // A feed's reader status: admins read all of them at once from /v1/status, readers one by one.
  async function feedStatuses() {
    if (!session.admin) return null;
    try {
      return (await getJson("/v1/status")).feeds ?? {};
    } catch {
      return null;
    }
  }

  let statuses = null;
  async function feedRow(feed) {
    let st = statuses?.[feed.id];
    if (!st) {
      try {
        st = (await getJson(`/v1/feeds/${encodeURIComponent(feed.id)}`)).status;
      } catch {
        st = { state: "unknown" };
      }
    }
    const state = st.connected ? "connected" : (st.state ?? (st.running ? "running" : "stopped"));
    return el("tr", { dataset: { feed: feed.id } },
      el("th", { scope: "row" }, feed.name ? `${feed.name} (${feed.id})` : feed.id),
      el("td", { class: "url" }, feed.url),
      el("td", {}, el("span", { class: `state ${state}` }, state)),
      el("td", {}, st.last_error ?? ""));
  }

  async function showTimeline(sourceId, start, end) {
    select.value = sourceId;
    timeline.replaceChildren(el("p", {}, `Loading ${sourceId}…`));
    try {
      const { segments } = await getJson(`${sourcePath(sourceId)}/segments${query({ start, end })}`);
      const shown = segments.slice(-TIMELINE_SHOWN);
      const heading = el("p", {}, `${sourceId}: ${segments.length} segments`,
                         segments.length > shown.length ? `, the latest ${shown.length} shown` : "");
      timeline.replaceChildren(heading, el("ol", { class: "tiles" }, shown.map((s) => segmentTile(sourceId, s))));
      showNote(status, "");
    } catch (error) {
      timeline.replaceChildren();
      showError(status, error);
    }
  }

  function segmentTile(sourceId, segment) {
    const item = el("li", { class: "tile", dataset: { segment: segment.segment_id } });
    const open = el("button", { type: "button", class: "tile-button", title: segment.caption ?? "",
                                "aria-label": `play ${segment.segment_id}` },
                    thumbnail(segment.thumbnail_url, `segment at ${when(segment)}`),
                    el("span", {}, when(segment)));
    open.addEventListener("click", () => {
      const player = clipPlayer(sourceId, segment.t0, segment.t1);
      item.replaceChildren(player);
      $("button.play", player).click();
    });
    item.append(open);
    if (segment.caption) item.append(el("p", { class: "caption" }, segment.caption));
    return item;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    showTimeline(select.value, $("#timeline-start", root).value, $("#timeline-end", root).value);
  });
  session.on("sources", () => {
    const current = select.value;
    select.replaceChildren(...session.sources.map((id) => el("option", { value: id }, id)));
    if (session.sources.includes(current)) select.value = current;
  });

  return {
    start: () => every(POLL_MS, async () => {
      statuses = await feedStatuses();
      await refresh();
    }),
  };
}
