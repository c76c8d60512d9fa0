// Admin: register and remove feeds, start archive jobs and follow their progress (polled until they finish).
import { getJson, postJson, remove } from "./api.js";
import { $, el, every, showError, showNote } from "./ui.js";

const JOB_POLL_MS = 1000;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const JOBS_ITEM = "tubescope.jobs";    // the jobs started in this tab, so a reload keeps following them

export function adminPanel(root, session) {
  const status = $(".status", root);
  const feedForm = $("#feed-form", root);
  const jobForm = $("#job-form", root);
  const jobList = $("#job-list", root);
  const feedList = $("#admin-feeds", root);
  const jobs = new Map();              // job id -> its <li>

  feedForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = (id) => $(id, root).value.trim() || undefined;
    try {
      const feed = await postJson("/v1/feeds", { url: value("#feed-url"), name: value("#feed-name"),
                                                 id: value("#feed-id") });
      showNote(status, `Registered feed ${feed.id}`);
      feedForm.reset();
      await listFeeds();
    } catch (error) {
      showError(status, error);
    }
  });

  async function listFeeds() {
    const { feeds } = await getJson("/v1/feeds");
    feedList.replaceChildren(...feeds.map((feed) => {
      const del = el("button", { type: "button" }, "Remove");
      del.addEventListener("click", async () => {
        try {
          await remove(`/v1/feeds/${encodeURIComponent(feed.id)}`);
          showNote(status, `Removed feed ${feed.id}`);
          await listFeeds();
        } catch (error) {
          showError(status, error);
        }
      });
      return el("li", { dataset: { feed: feed.id } }, `${feed.id} `, el("code", {}, feed.url), " ", del);
    }));
  }

  jobForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const paths = $("#job-paths", root).value.split("\n").map((p) => p.trim()).filter(Boolean);
    const body = { paths };
    const source = $("#job-source", root).value.trim();
    if (source) body.source_id = source;
    try {
      const job = await postJson("/v1/jobs", body);
      showNote(status, `Started job ${job.id}`);
      jobForm.reset();
      remember(job.id);
      showJob(job);
    } catch (error) {
      showError(status, error);
    }
  });

  function remember(id) {
    const ids = JSON.parse(sessionStorage.getItem(JOBS_ITEM) ?? "[]");
    if (!ids.includes(id)) sessionStorage.setItem(JOBS_ITEM, JSON.stringify([...ids, id]));
  }

  function showJob(job) {
    let item = jobs.get(job.id);
    if (!item) {
      item = el("li", { dataset: { job: job.id } });
      jobs.set(job.id, item);
      jobList.prepend(item);
    }
    const done = (job.indexed?.length ?? 0) + (job.failures?.length ?? 0);
    const progress = el("progress", { max: job.files_total || 1, value: FINAL.has(job.state) ? (job.files_total || 1)
                                                                                            : done,
                                      "aria-label": `job ${job.id} progress` });
    const cancel = el("button", { type: "button", disabled: FINAL.has(job.state) }, "Cancel");
    cancel.addEventListener("click", async () => {
      try {
        showJob(await remove(`/v1/jobs/${encodeURIComponent(job.id)}`));
      } catch (error) {
        showError(status, error);
      }
    });
    item.dataset.state = job.state;
    item.replaceChildren(
      el("strong", {}, job.id), ` ${job.source_id ?? ""} `, el("span", { class: `state ${job.state}` }, job.state),
      progress,
      ` ${done}/${job.files_total ?? "?"} files, ${job.segments} segments`,
      job.waiting ? el("p", {}, `Waiting: ${job.waiting}`) : null,
      job.error ? el("p", { class: "error" }, job.error) : null,
      (job.failures ?? []).length ? el("ul", {}, job.failures.map((f) => el("li", {}, JSON.stringify(f)))) : null,
      cancel);
  }

  async function pollJobs() {
    for (const [id, item] of jobs) {
      if (FINAL.has(item.dataset.state)) continue;
      try {
        showJob(await getJson(`/v1/jobs/${encodeURIComponent(id)}`));
      } catch (error) {
        showError(status, error);
      }
    }
  }

  return {
    start: () => {
      if (!session.admin) return () => {};
      for (const id of JSON.parse(sessionStorage.getItem(JOBS_ITEM) ?? "[]")) {
        if (!jobs.has(id)) showJob({ id, state: "queued", segments: 0 });
      }
      listFeeds().catch((error) => showError(status, error));
      return every(JOB_POLL_MS, pollJobs);
    },
  };
}
