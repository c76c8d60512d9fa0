// A clip player: a <video> over a blob URL of GET /v1/sources/{id}/clip, started at the cited time, with an
// overlay that draws an answer's boxes (source pixels) scaled to the frame as shown.
import { clip } from "./api.js";
import { el, showError, showNote } from "./ui.js";

const BOX_SHOWN_S = 1.0;          // a box is drawn while the video is within this of the box's time

// A figure that loads and plays source `sourceId` from `t0` to `t1`, starting at `cited` (seconds on the source's
// clock), drawing `boxes` ([{label, x1, y1, x2, y2, t}]).
export function clipPlayer(sourceId, t0, t1, cited = t0, boxes = []) {
  const video = el("video", { controls: true, muted: true, playsinline: true, preload: "auto",
                              "aria-label": `clip of ${sourceId} from ${t0}` });
  const overlay = el("div", { class: "boxes", "aria-hidden": "true" });
  const status = el("p", { class: "status", role: "status" });
  const button = el("button", { type: "button", class: "play" }, "Play clip");
  const figure = el("figure", { class: "player", dataset: { source: sourceId, t0, t1 } },
                    el("div", { class: "frame" }, video, overlay), button, status);
  let clipStart = t0;

  const draw = () => drawBoxes(overlay, video, boxes, clipStart + video.currentTime);
  video.addEventListener("timeupdate", draw);
  video.addEventListener("loadeddata", draw);
  new ResizeObserver(draw).observe(video);

  button.addEventListener("click", async () => {
    button.disabled = true;
    showNote(status, "Loading clip…");
    try {
      const got = await clip(sourceId, t0, t1);
      clipStart = got.start;
      video.addEventListener("loadedmetadata", () => {
        video.currentTime = Math.max(0, cited - clipStart);
        showNote(status, `Clip ${got.start.toFixed(1)}–${got.end.toFixed(1)} s, from ${cited.toFixed(1)} s`);
        video.play().catch(() => { /* autoplay refused: the controls still play it */ });
      }, { once: true });
      video.src = got.url;
      figure.dataset.loaded = "true";
    } catch (error) {
      showError(status, error);
      button.disabled = false;
    }
  });
  return figure;
}

function drawBoxes(overlay, video, boxes, now) {
  overlay.replaceChildren();
  if (!video.videoWidth || !boxes.length) return;
  const scale = video.clientWidth / video.videoWidth;       // the video keeps its aspect: one scale for both axes
  for (const box of boxes) {
    if (box.t !== undefined && Math.abs(box.t - now) > BOX_SHOWN_S) continue;
    const div = el("div", { class: "box" }, el("span", {}, box.label || "object"));
    // CSSOM properties, not a style attribute: the page's CSP allows no inline styles
    div.style.left = `${box.x1 * scale}px`;
    div.style.top = `${box.y1 * scale}px`;
    div.style.width = `${(box.x2 - box.x1) * scale}px`;
    div.style.height = `${(box.y2 - box.y1) * scale}px`;
    overlay.append(div);
  }
}
