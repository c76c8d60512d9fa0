// The console's entry point: sign in with an API key, switch panels, start and stop their polling.
import { ApiError, forgetKey, getJson, savedKey, saveKey } from "./api.js";
import { adminPanel } from "./admin.js";
import { alertsPanel } from "./alerts.js";
import { $, showError } from "./ui.js";
import { askPanel, searchPanel } from "./search.js";
import { sourcesPanel } from "./sources.js";

// What the panels share: the signed-in key's role and the sources it sees, with a tiny event hub.
const session = {
  admin: false,
  sources: [],
  handlers: {},
  on(name, fn) { (this.handlers[name] ??= []).push(fn); },
  emit(name) { for (const fn of this.handlers[name] ?? []) fn(); },
};

const panels = {
  sources: sourcesPanel($("#sources"), session),
  search: searchPanel($("#search"), session),
  ask: askPanel($("#ask"), session),
  alerts: alertsPanel($("#alerts"), session),
  admin: adminPanel($("#admin"), session),
};
let stopPanel = null;

function showPanel(name) {
  for (const tab of document.querySelectorAll("#tabs button")) {
    const on = tab.dataset.panel === name;
    tab.setAttribute("aria-selected", String(on));
    $(`#${tab.dataset.panel}`).hidden = !on;
  }
  if (stopPanel) stopPanel();
  stopPanel = panels[name]?.start?.() ?? null;
}

// Checks the key: any valid key lists sources (else 401); only an admin key reads /v1/status (else 403).
async function signIn(key) {
  saveKey(key);
  try {
    session.sources = (await getJson("/v1/sources")).sources.map((s) => s.source_id);
  } catch (error) {
    forgetKey();
    throw error;
  }
  try {
    await getJson("/v1/status");
    session.admin = true;
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 403) throw error;
    session.admin = false;
  }
  document.body.dataset.role = session.admin ? "admin" : "reader";
  $("#role").textContent = session.admin ? "Signed in (admin key)" : "Signed in (reader key)";
  $("#sign-in").hidden = true;
  $("#console").hidden = false;
  $("#sign-out").hidden = false;
  $("#admin-tab").hidden = !session.admin;
  session.emit("sources");
  showPanel("sources");
}

// Forgets the key and everything this tab kept, and starts the page afresh: nothing the last key could see stays
// in the page for the next one.
function signOut() {
  if (stopPanel) stopPanel();
  forgetKey();
  window.location.reload();
}

$("#sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("#api-key");
  try {
    await signIn(input.value.trim());
    input.value = "";
  } catch (error) {
    showError($("#sign-in .status"), error);
  }
});
$("#sign-out").addEventListener("click", signOut);
for (const tab of document.querySelectorAll("#tabs button")) {
  tab.addEventListener("click", () => showPanel(tab.dataset.panel));
}

if (savedKey()) {
  signIn(savedKey()).catch((error) => showError($("#sign-in .status"), error));
}
