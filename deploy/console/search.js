// Search (hits with thumbnails, each playable) and ask (the answer streamed as it is decoded, its evidence as clips
// that play from the cited time with the answer's boxes drawn on the frame).
import { postJson, readEvents, send } from "./api.js";
import { clipPlayer } from "./player.js";
import { $, el, showError, showNote, thumbnail, when } from "./ui.js";

function chosenSources(select) {
  const picked = [...select.selectedOptions].map((o) => o.value);
  return picked.length ? picked : undefined;        // none picked: every source the key may see
}

function fillSources(select, sources) {
  const picked = new Set([...select.selectedOptions].map((o) => o.value));
  select.replaceChildren(...sources.map((id) => el("option", { value: id, selected: picked.has(id) }, id)));
}

export function searchPanel(root, session) {
  const form = $("#search-form", root);
  const status = $(".status", root);
  const results = $("#search-results", root);
  const select = $("#search-sources", root);
  session.on("sources", () => fillSources(select, session.sources));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    results.replaceChildren();
    showNote(status, "Searching…");
    const body = { query: $("#search-query", root).value, limit: Number($("#search-limit", root).value) || 10 };
    const sources = chosenSources(select);
    if (sources) body.sources = sources;
    try {
      const out = await postJson("/v1/search", body);
      results.replaceChildren(...out.results.map(hitItem));
      showNote(status, `${out.results.length} hits`);
    } catch (error) {
      showError(status, error);
    }
  });

  function hitItem(hit) {
    const item = el("li", { class: "hit", dataset: { segment: hit.segment_id } },
      thumbnail(hit.thumbnail_url, `${hit.source} at ${when(hit)}`),
      el("div", {}, el("strong", {}, `${hit.source} ${when(hit)}`), ` score ${Number(hit.score).toFixed(3)}`,
         hit.caption ? el("p", { class: "caption" }, hit.caption) : null));
    const play = el("button", { type: "button" }, "Play");
    play.addEventListener("click", () => {
      const player = clipPlayer(hit.source, hit.t0, hit.t1);
      play.replaceWith(player);
      $("button.play", player).click();
    });
    item.append(play);
    return item;
  }
}

export function askPanel(root, session) {
  const form = $("#ask-form", root);
  const status = $(".status", root);
  const answer = $("#answer", root);
  const evidence = $("#evidence", root);
  const select = $("#ask-sources", root);
  const submit = $("button[type=submit]", form);
  session.on("sources", () => fillSources(select, session.sources));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    answer.textContent = "";
    evidence.replaceChildren();
    delete answer.dataset.done;
    const body = { question: $("#ask-question", root).value, stream: true,
                   sources: chosenSources(select) ?? session.sources };
    showNote(status, "Asking…");
    submit.disabled = true;
    try {
      const response = await send("POST", "/v1/ask", body);
      await readEvents(response, (name, data) => {
        if (name === "token") answer.textContent += data.text;
        else if (name === "result") showResult(data);
        else if (name === "error") throw Object.assign(new Error(data.error), { status: data.status });
      });
    } catch (error) {
      showError(status, error);
    } finally {
      submit.disabled = false;
    }
  });

  function showResult(result) {
    answer.textContent = result.answer;         // the final text: box markup already replaced by labels
    answer.dataset.done = "true";
    showNote(status, `Answered from ${result.evidence.length} segments`);
    const boxes = result.boxes ?? [];
    evidence.replaceChildren(...result.evidence.map((e) => evidenceItem(e, boxes.filter(
      (b) => b.segment_id === e.segment_id))));
  }

  function evidenceItem(e, boxes) {
    const cited = boxes.length ? boxes[0].t : e.t0;
    return el("li", { class: "evidence", dataset: { segment: e.segment_id } },
      el("p", {}, el("strong", {}, e.source), ` ${e.start ?? ""}–${e.end ?? ""}`,
         boxes.length ? ` · ${boxes.map((b) => b.label || "object").join(", ")}` : ""),
      thumbnail(e.thumbnail_url, `${e.source} at ${when(e)}`),
      clipPlayer(e.source, e.t0, e.t1, cited, boxes));
  }
}
