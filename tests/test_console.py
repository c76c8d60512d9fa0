"""The web console in a real browser: Debian's headless Chromium driven by Selenium, against the real app (Ray
Serve over HTTP, real Redis, a clip indexed by a real archive job). One browser for the module; the tests run in file
order (sign in first). Each checks the page and saves a screenshot under tests/artifacts/console/.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from deploy.alerts import AlertStore, make_hit
from deploy.api.console import CONTENT_SECURITY_POLICY
from deploy.app import run_app, stop_app
from pipeline.events import ALERTS_STREAM, EventSink
from pipeline.redis_server import free_port
from pipeline.settings import load_settings
from services import start_redis
from test_boxes import PIECES, boxing_checkpoint
from videos import encode_video

ADMIN = "admin-key-0123456789"
READER = "reader-key-0123456789"
CAM_ADMIN = "camadmin-key-0123456789"          # an admin limited to source "cam1"
SOURCE = "lobby"
ANSWER = "At 0:03 a red car enters."          # the boxing checkpoint's answer: its box is cited at 0:03
BOX = {"x1": 38, "y1": 61, "x2": 179, "y2": 140}     # its (120,340),(560,780) of 1000 on the 320x180 clip
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).parent / "artifacts" / "console"
# the switches that keep Chromium from calling out (a closed network refuses those connections and it stalls)
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic", "--window-size=1280,900", "--autoplay-policy=no-user-gesture-required"]
pytestmark = pytest.mark.timeout(120)     # chromium and chromium-driver come from .ci/system-packages


@pytest.fixture(scope="module")
def console(tmp_path_factory, ray_local):
    """The app with an archive clip indexed as SOURCE; {url, redis, clip}. Its model answers every question with
    ANSWER and a box (tests/test_boxes.py)."""
    root = tmp_path_factory.mktemp("console")
    videos = root / "videos"
    clip = encode_video(videos / "lobby.mp4", 320, 180, 30, seconds=4.0, gop=15).path     # 2 segments of 2 s
    redis = start_redis(root / "redis")
    settings = load_settings(
        data_dir=root / "data", redis_url=redis.url, file_roots=[videos], segment_seconds=2.0,
        model_path=boxing_checkpoint(root / "model", PIECES), min_pixels=4 * 784, max_pixels=16 * 784, captions=False,
        decoder_cpus=0, api_max_new_tokens=32, api_default_new_tokens=16,
        api_keys=[{"key": ADMIN, "role": "admin"}, {"key": READER, "role": "reader"},
                  {"key": CAM_ADMIN, "role": "admin", "sources": ["cam1"]}])
    url = run_app(settings, host="127.0.0.1", port=free_port(), feeds=False, live=False)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as c:
        job = c.post("/v1/jobs", json={"paths": [str(clip)], "source_id": SOURCE}).json()
        deadline = time.monotonic() + 90
        while c.get(f"/v1/jobs/{job['id']}").json()["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, "the archive job did not finish"
            time.sleep(0.3)
        assert [s["source_id"] for s in c.get("/v1/sources").json()["sources"]] == [SOURCE]
    yield {"url": url, "redis": redis, "clip": clip}
    stop_app()
    redis.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # the page itself at 1280x800 (the window size counts the browser's own bars)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait(driver, condition, what: str, timeout_s: float = 30):
    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(lambda d: condition())
    except TimeoutException:
        logs = "\n".join(e["message"] for e in driver.get_log("browser"))
        raise AssertionError(f"timed out waiting for {what}; browser console:\n{logs}") from None


def shot(driver, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


def find(driver, css: str):
    return driver.find_element(By.CSS_SELECTOR, css)


def visible_text(driver, css: str) -> str:
    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed())


def fill(driver, css: str, text: str) -> None:
    field = find(driver, css)
    field.clear()
    field.send_keys(text)


def click(driver, css: str) -> None:
    """Click what `css` finds, again if the page redrew it meanwhile."""
    def clicked():
        try:
            find(driver, css).click()
            return True
        except (StaleElementReferenceException, NoSuchElementException):
            return False
    wait(driver, clicked, f"a click on {css}")


def tab(driver, name: str) -> None:
    find(driver, f'#tabs button[data-panel="{name}"]').click()
    wait(driver, lambda: find(driver, f"#{name}").is_displayed(), f"the {name} panel")


# ---- sign in -------------------------------------------------------------------------------------------------------
def test_pages_are_public_with_a_strict_policy(console):
    r = httpx.get(console["url"] + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
    assert not re.search(r"<script(?![^>]*\bsrc=)", r.text)            # no inline script to allow
    js = httpx.get(console["url"] + "/console/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    missing = httpx.get(console["url"] + "/console/..%2Fapi%2Fconsole.py")
    assert missing.status_code == 404 and "error" in missing.json()


def test_sign_in_refuses_a_wrong_key_then_shows_sources(console, browser):
    browser.get(console["url"] + "/")
    fill(browser, "#api-key", "not-a-key")
    find(browser, "#sign-in-form button[type=submit]").click()
    wait(browser, lambda: "Not signed in" in visible_text(browser, "#sign-in .status"), "the 401 message")
    assert browser.execute_script("return sessionStorage.getItem('tubescope.key')") is None

    fill(browser, "#api-key", ADMIN)
    find(browser, "#sign-in-form button[type=submit]").click()
    wait(browser, lambda: find(browser, "#console").is_displayed(), "the console")
    assert find(browser, "#role").text == "Signed in (admin key)" and find(browser, "#admin-tab").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('tubescope.key')") == ADMIN
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, f'#source-list tr[data-source="{SOURCE}"]'),
         "the source row")
    row = find(browser, f'#source-list tr[data-source="{SOURCE}"]').text
    assert row.startswith(f"{SOURCE} 2 ")                                  # two segments
    click(browser, f'#source-list tr[data-source="{SOURCE}"] button')      # the list is redrawn every 5 s
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#timeline .tile")) == 2, "the timeline")
    assert "2 segments" in find(browser, "#timeline").text
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#timeline img.thumb")) == 2,
         "the timeline's thumbnails")
    shot(browser, "1-sources")
    assert not [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


# ---- search --------------------------------------------------------------------------------------------------------
def test_search_shows_hits_and_validation_errors(console, browser):
    tab(browser, "search")
    fill(browser, "#search-query", "a white box")
    fill(browser, "#search-limit", "5")
    find(browser, "#search-form button[type=submit]").click()
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#search-results .hit")) == 2, "two hits")
    hits = browser.find_elements(By.CSS_SELECTOR, "#search-results .hit")
    assert {h.get_attribute("data-segment") for h in hits} == {f"{SOURCE}:0", f"{SOURCE}:2000"}
    assert all(h.find_element(By.CSS_SELECTOR, ".thumb") for h in hits)
    # thumbnails fetched with the key, shown as blob URLs
    wait(browser, lambda: browser.execute_script(
        "const shown = [...document.querySelectorAll('#search-results img.thumb')];"
        "return shown.length == 2 && shown.every(i => i.src.startsWith('blob:') && i.complete "
        "&& i.naturalWidth > 0)"), "the hits' thumbnails")
    shot(browser, "2-search")

    fill(browser, "#search-limit", "1000")              # over api_max_search_results: the server's 422, shown
    find(browser, "#search-form button[type=submit]").click()
    wait(browser, lambda: "Invalid input" in visible_text(browser, "#search .status"), "the 422 message")
    assert "api_max_search_results" in find(browser, "#search .status").text
    assert find(browser, "#search .status").get_attribute("data-status") == "422"


# ---- ask -----------------------------------------------------------------------------------------------------------
def test_ask_streams_the_answer_with_its_evidence(console, browser):
    tab(browser, "ask")
    fill(browser, "#ask-question", "What moves?")
    find(browser, "#ask-form button[type=submit]").click()
    wait(browser, lambda: find(browser, "#answer").get_attribute("data-done") == "true", "the answer")
    assert find(browser, "#answer").text == ANSWER                        # the label in place of the box markup
    evidence = browser.find_elements(By.CSS_SELECTOR, "#evidence .evidence")
    assert [e.get_attribute("data-segment") for e in evidence] == [f"{SOURCE}:0", f"{SOURCE}:2000"]
    assert "a red car" in evidence[1].text and "a red car" not in evidence[0].text     # the box's segment
    assert all(e.find_element(By.CSS_SELECTOR, "video") for e in evidence)
    shot(browser, "3-ask")


def test_evidence_clip_plays_from_the_cited_time(console, browser):
    second = find(browser, f'#evidence .evidence[data-segment="{SOURCE}:2000"]')
    second.find_element(By.CSS_SELECTOR, "button.play").click()
    state = wait(browser, lambda: browser.execute_script(
        "const v = arguments[0]; return v.readyState >= 2 && v.duration > 0 "
        "&& {ready: v.readyState, duration: v.duration, time: v.currentTime, src: v.src}",
        second.find_element(By.CSS_SELECTOR, "video")), "the evidence clip to play")
    assert state["src"].startswith("blob:") and state["duration"] > 0
    start = float(re.search(r"Clip ([\d.]+)", second.find_element(By.CSS_SELECTOR, ".status").text).group(1))
    assert state["time"] + start == pytest.approx(3.0, abs=0.6)           # from the cited time: the box's
    video = second.find_element(By.CSS_SELECTOR, "video")
    browser.execute_script("arguments[0].pause(); arguments[0].currentTime = 3.0 - arguments[1]", video, start)
    wait(browser, lambda: second.find_elements(By.CSS_SELECTOR, ".boxes .box"), "the box drawn on the frame")
    drawn = browser.execute_script(
        "const v = arguments[0], b = arguments[1].getBoundingClientRect(), f = v.getBoundingClientRect();"
        "return {scale: v.clientWidth / v.videoWidth, x: b.left - f.left, y: b.top - f.top, w: b.width, h: b.height,"
        " label: arguments[1].textContent}", video, second.find_element(By.CSS_SELECTOR, ".boxes .box"))
    scale = drawn["scale"]
    assert drawn["label"] == "a red car" and scale > 0
    assert (drawn["x"], drawn["y"]) == (pytest.approx(BOX["x1"] * scale, abs=1.5),
                                        pytest.approx(BOX["y1"] * scale, abs=1.5))
    assert (drawn["w"], drawn["h"]) == (pytest.approx((BOX["x2"] - BOX["x1"]) * scale, abs=1.5),
                                        pytest.approx((BOX["y2"] - BOX["y1"]) * scale, abs=1.5))
    shot(browser, "4-clip")


# ---- alerts --------------------------------------------------------------------------------------------------------
def test_create_an_alert_see_its_hits_live_and_delete_it(console, browser, tmp_path):
    tab(browser, "alerts")
    fill(browser, "#alert-query", "a person at the door")
    fill(browser, "#alert-sources", SOURCE)
    fill(browser, "#alert-threshold", "1.5")
    find(browser, "#alert-form button[type=submit]").click()
    wait(browser, lambda: "Created alert" in visible_text(browser, "#alerts .status"), "the created alert")
    alert_id = find(browser, "#alerts .status").text.split()[-1]
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, f'#alert-list tr[data-alert="{alert_id}"]'),
         "the alert listed")
    assert find(browser, f'#alert-list tr[data-alert="{alert_id}"]').text.startswith(f"a person at the door {SOURCE}")
    fill(browser, "#alert-query", " ")                                    # blank: refused with the server's words
    fill(browser, "#alert-sources", SOURCE)
    find(browser, "#alert-form button[type=submit]").click()
    wait(browser, lambda: "Invalid input" in visible_text(browser, "#alerts .status"), "the 422 message")
    assert "query must not be empty" in find(browser, "#alerts .status").text

    # a hit as the alert follower writes it, to the real stream: the page shows it live, without a reload
    wait(browser, lambda: "Live" in visible_text(browser, "#alert-live"), "the live hit stream")
    alert = AlertStore(console["redis"].client()).get(alert_id)
    hit = make_hit(alert, {"source_id": SOURCE, "segment_id": f"{SOURCE}:2000", "t0": 2.0, "t1": 4.0}, 3.25, "a car")
    EventSink(console["redis"].url, tmp_path / "outbox", flush_interval_s=None).emit(ALERTS_STREAM, hit)
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, f'#alert-hits .hit[data-alert="{alert_id}"]'),
         "the hit shown live")
    shown = find(browser, f'#alert-hits .hit[data-alert="{alert_id}"]')
    assert "score 3.250" in shown.text and "a car" in shown.text
    wait(browser, lambda: shown.find_elements(By.CSS_SELECTOR, "img.thumb"), "the hit's thumbnail")
    shot(browser, "5-alerts")

    click(browser, f'#alert-list tr[data-alert="{alert_id}"] button')
    wait(browser, lambda: not browser.find_elements(By.CSS_SELECTOR, f'#alert-list tr[data-alert="{alert_id}"]'),
         "the alert deleted")
    assert f"Deleted alert {alert_id}" in find(browser, "#alerts .status").text


# ---- admin, scopes and sign out ------------------------------------------------------------------------------------
def test_an_admin_runs_an_archive_job_and_registers_a_feed(console, browser):
    tab(browser, "admin")
    fill(browser, "#job-paths", str(console["clip"]))
    fill(browser, "#job-source", SOURCE)
    find(browser, "#job-form button[type=submit]").click()
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, '#job-list li[data-state="succeeded"]'),
         "the job to succeed")
    job = find(browser, "#job-list li")
    progress = job.find_element(By.CSS_SELECTOR, "progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "1"
    assert "1/1 files" in job.text                                         # already indexed: skipped, done

    fill(browser, "#feed-url", str(console["clip"]))                       # a local file under file_roots
    fill(browser, "#feed-id", "door")
    find(browser, "#feed-form button[type=submit]").click()
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, '#admin-feeds li[data-feed="door"]'), "the feed")
    fill(browser, "#feed-url", "ftp://camera/stream")                       # a scheme feeds may not use: 422
    find(browser, "#feed-form button[type=submit]").click()
    wait(browser, lambda: "Invalid input" in visible_text(browser, "#admin .status"), "the 422 message")
    shot(browser, "6-admin-job")
    tab(browser, "sources")                                                 # the feed with its reader's state
    wait(browser, lambda: browser.execute_script(                           # this app runs no readers: pending
        "return document.querySelector('#feed-list tr[data-feed=\"door\"] .state')?.textContent"),
        "the feed's status")
    tab(browser, "admin")
    click(browser, '#admin-feeds li[data-feed="door"] button')              # the list is redrawn as the tab opens
    wait(browser, lambda: "Removed feed door" in visible_text(browser, "#admin .status"), "the feed removed")


def test_scope_errors_are_shown_and_signing_out_forgets_the_key(console, browser):
    find(browser, "#sign-out").click()
    wait(browser, lambda: not find(browser, "#console").is_displayed(), "the page signed out")
    assert browser.execute_script("return sessionStorage.length") == 0
    fill(browser, "#api-key", CAM_ADMIN)                                  # an admin of another source only
    find(browser, "#sign-in-form button[type=submit]").click()
    wait(browser, lambda: find(browser, "#role").text == "Signed in (admin key)", "the limited admin")
    wait(browser, lambda: find(browser, "#sources").get_attribute("data-loaded") == "true", "the sources")
    assert not browser.find_elements(By.CSS_SELECTOR, "#source-list tr")   # it sees no source
    tab(browser, "admin")
    fill(browser, "#job-paths", str(console["clip"]))
    find(browser, "#job-form button[type=submit]").click()                 # no source_id: the API refuses (403)
    wait(browser, lambda: "Not allowed with this key" in visible_text(browser, "#admin .status"), "the 403")
    assert "limited to sources ['cam1']" in find(browser, "#admin .status").text
    shot(browser, "7-scope-error")

    find(browser, "#sign-out").click()
    wait(browser, lambda: not find(browser, "#console").is_displayed(), "the page signed out")
    fill(browser, "#api-key", READER)
    find(browser, "#sign-in-form button[type=submit]").click()
    wait(browser, lambda: find(browser, "#role").text == "Signed in (reader key)", "the reader")
    assert not find(browser, "#admin-tab").is_displayed() and not find(browser, "#alert-form").is_displayed()
    # nothing the console did in this file needed more than the page's policy allows
    assert not [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
