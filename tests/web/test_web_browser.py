"""The page in a real browser: Debian's Chromium driven by selenium, against a real agent fed by the
camera simulator and a real `coilsight web` process. Screenshots are kept as test artifacts (the
test's tmp dir, and $COILSIGHT_TEST_ARTIFACTS when set).

Skipped, with the reason, only where chromium or chromedriver is absent (CI installs them:
scripts/ensure-system-tools.sh)."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest
from tinypack import clean_frame, frame_with

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="chromium and chromedriver not installed (Debian: chromium, chromium-driver)")


def start_web(cfg_path: Path, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """`coilsight web` as its own process on a free port; returns it and its URL."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    err = open(tmp_path / "web.stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "web", "--config", str(cfg_path), "--port", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        err.seek(0)
        m = re.search(r"serving (http://127\.0\.0\.1:\d+/)", err.read())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    err.seek(0)
    raise AssertionError(f"coilsight web did not start: {err.read()}")


def chrome(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-default-apps", "--disable-extensions", "--window-size=1280,1400",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def save_screenshot(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), f"no screenshot {name}"
    if os.environ.get("COILSIGHT_TEST_ARTIFACTS"):
        out = Path(os.environ["COILSIGHT_TEST_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / f"web-{name}")


def test_live_map_upload_and_past_coils_in_chromium(running_agent, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from agent.config import config_dict, dump_toml
    from agent.tools.camera_sim import CameraSim

    agent = running_agent()
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(dump_toml(config_dict(agent.cfg)))
    web, url = start_web(cfg_path, tmp_path)
    driver = None
    try:
        driver = chrome(tmp_path)
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        driver.get(url)
        stream = driver.find_element(By.ID, "stream-state")
        wait.until(lambda d: stream.get_attribute("data-state") == "live", "the event stream did not open")

        # A short coil: 3 bright squares and 2 dark ones, the rest clean; sent at a line rate so the
        # map grows while the page watches.
        truth = {0: ("bright", 32), 4: ("dark", 96), 8: ("bright", 160), 12: ("dark", 200), 16: ("bright", 64)}
        frames = [(frame_with(truth[i][0], x=truth[i][1], y=24), None) if i in truth else (clean_frame(), None)
                  for i in range(20)]
        cam = CameraSim(agent.cfg.ingest.endpoint, camera="cam0")
        sender = threading.Thread(target=lambda: (cam.send_coil("web-coil-1", frames, rate_hz=20.0,
                                                                mm_per_px_y=2.0), cam.close()), daemon=True)
        sender.start()
        svg = driver.find_element(By.ID, "strip-map")
        wait.until(lambda d: int(svg.get_attribute("data-count")) >= 1, "no defect on the map")  # while the coil runs
        wait.until(lambda d: driver.find_element(By.ID, "coil-state").get_attribute("data-state") == "complete",
                   "the coil never showed as complete")
        sender.join(10)
        assert svg.get_attribute("data-coil") == "web-coil-1"
        rects = svg.find_elements(By.CSS_SELECTOR, "rect.defect")
        assert len(rects) == 5 and svg.get_attribute("data-count") == "5"
        by_class = {}
        for r in rects:
            by_class.setdefault(r.get_attribute("data-class"), set()).add(r.get_attribute("fill"))
        assert sorted(by_class) == ["bright", "dark"]
        assert len(by_class["bright"] | by_class["dark"]) == 2  # one colour per class
        # defects are placed along the coil in frame order
        xs = {int(r.get_attribute("data-seq")): float(r.get_attribute("x")) for r in rects}
        assert [xs[s] for s in sorted(xs)] == sorted(xs.values())
        counts = {td.get_attribute("data-class"): td.text for td in
                  driver.find_elements(By.CSS_SELECTOR, "#counts td[data-class]")}
        assert counts == {"bright": "3", "dark": "2"}
        assert len(driver.find_elements(By.CSS_SELECTOR, "#latest tbody tr")) == 5
        assert "coil budget" in driver.find_element(By.ID, "budget-time").text
        if importlib.util.find_spec("agent.crops") is not None:  # the coil layer: a grade, a crop per track
            grade = driver.find_element(By.ID, "coil-grade")
            wait.until(lambda d: grade.get_attribute("data-grade") in ("pass", "downgrade", "fail"), "no grade shown")
            wait.until(lambda d: d.execute_script(
                "const i = [...document.querySelectorAll('#latest img.crop')];"
                "return i.length === 5 && i.every(x => x.complete && x.naturalWidth > 0)"), "the crops did not show")
        save_screenshot(driver, tmp_path, "live-coil.png")

        # the coil is in the past coils table (read from the journal)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#coils tr[data-coil="web-coil-1"]'),
                   "the coil is not in the past coils")

        # Upload an image: the overlay and the events come back.
        image = tmp_path / "square.png"
        cv2.imwrite(str(image), frame_with("bright", x=120, y=20))
        driver.find_element(By.ID, "upload-file").send_keys(str(image))
        driver.find_element(By.ID, "upload-go").click()
        status = driver.find_element(By.ID, "upload-status")
        wait.until(lambda d: status.get_attribute("data-events") is not None or "refused" in status.text,
                   "no answer to the upload")
        assert status.get_attribute("data-events") == "1", status.text
        overlay = driver.find_element(By.ID, "overlay")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay),
                   "the overlay did not load")
        assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]",
                                     overlay) == [256, 64]
        assert '"bright"' in driver.find_element(By.ID, "upload-json").text
        save_screenshot(driver, tmp_path, "upload-overlay.png")
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert errors == [], errors

        # the past coil's report, where `coilsight report` is installed (agent/tools/report.py)
        links = driver.find_elements(By.CSS_SELECTOR, '#coils tr[data-coil="web-coil-1"] a.report-link')
        if importlib.util.find_spec("agent.tools.report") is not None:
            assert len(links) == 1
            driver.get(links[0].get_attribute("href"))
            wait.until(lambda d: "web-coil-1" in d.find_element(By.TAG_NAME, "h1").text, "no coil report")
            assert driver.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
            save_screenshot(driver, tmp_path, "coil-report.png")
            errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
            assert errors == [], errors  # the report's own CSP lets its inline style and images through
        else:
            assert links == []
    except Exception:
        if driver is not None:  # what the page showed when it failed
            save_screenshot(driver, tmp_path, "failure.png")
        raise
    finally:
        if driver is not None:
            driver.quit()
        web.terminate()
        try:
            web.wait(10)
        except subprocess.TimeoutExpired:
            web.kill()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: systemd counts that a clean stop
    err = (tmp_path / "web.stderr").read_text()
    assert web.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, err
