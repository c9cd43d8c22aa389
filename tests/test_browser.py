"""Real-browser test: ``streamlit run app.py`` headless, driven by Debian's chromium through Selenium.

Walks the demo flow (data -> fit -> move tau -> open an image -> review -> coreset map -> detect heatmaps ->
deploy) and saves a screenshot of every step to ``artifacts/screenshots/``. With
``SOFTPATCH_UPDATE_SCREENSHOTS=1`` the screenshots are also copied to ``assets/screenshots/`` for the README.

Set-up: ``scripts/install_browser.sh`` (run by this test) installs chromium, chromium-driver and selenium
when missing; the test is skipped, with the reason, only if that is impossible on this machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenetv1_100_keras_in1k.safetensors"
SHOTS = REPO / "artifacts" / "screenshots"
README_SHOTS = REPO / "assets" / "screenshots"
TIMEOUT = 240


def _install_browser() -> str | None:
    """Run the idempotent install script; returns a reason to skip, or None when the browser is ready."""
    script = REPO / "scripts" / "install_browser.sh"
    try:
        done = subprocess.run(
            ["bash", str(script), sys.executable], capture_output=True, text=True, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not run {script.name}: {exc}"
    if done.returncode != 0:
        return f"chromium could not be installed: {(done.stderr or done.stdout).strip()[-400:]}"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not importable after installation"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited early:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.5)
    raise AssertionError(f"streamlit did not become healthy:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _install_browser()
    if reason:
        pytest.skip(reason)
    if not WEIGHTS.is_file():
        pytest.skip(f"real weights not found at {WEIGHTS} (expected ../shared/weights next to the repository)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = dict(os.environ)
    env.update(
        SOFTPATCH_BACKBONE="mobilenetv1_100",
        SOFTPATCH_WEIGHTS=str(WEIGHTS),
        SOFTPATCH_BACKBONE_KWARGS='{"bn_eps": 0.001, "pad_type": "same"}',
        SOFTPATCH_DEVICE="cpu",
        SOFTPATCH_WORK_DIR=str(tmp_path_factory.mktemp("work")),
    )
    log = SHOTS.parent / "streamlit-browser-test.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "streamlit", "run", "app.py",
                "--server.headless", "true",
                "--server.port", str(port),
                "--server.address", "127.0.0.1",
                "--browser.gatherUsageStats", "false",
            ],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def driver(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                "--window-size=1500,1250", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(arg)
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary:
        options.binary_location = binary
    service = Service(shutil.which("chromedriver")) if shutil.which("chromedriver") else Service()
    drv = webdriver.Chrome(options=options, service=service)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


# ------------------------------------------------------------------------------------------------ helpers


class App:
    def __init__(self, driver, url: str) -> None:
        self.d = driver
        self.url = url

    def by_css(self, css: str):
        from selenium.webdriver.common.by import By

        return self.d.find_elements(By.CSS_SELECTOR, css)

    def idle(self, timeout: float = TIMEOUT) -> None:
        """Wait until the script run is over (no 'running' indicator) and the page has settled."""
        time.sleep(0.6)
        deadline = time.monotonic() + timeout
        quiet_since = None
        while time.monotonic() < deadline:
            running = self.d.execute_script(
                "const w = document.querySelector('[data-testid=\"stStatusWidget\"]');"
                "return !!(w && /running|stop/i.test(w.innerText));"
            )
            if running:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 1.0:
                return
            time.sleep(0.25)
        raise AssertionError("the app kept running past the timeout")

    def text(self) -> str:
        return self.d.execute_script("return document.body.innerText")

    def wait_text(self, pattern: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.text()
            if re.search(pattern, body):
                return body
            time.sleep(0.3)
        raise AssertionError(f"text {pattern!r} did not appear; page shows:\n{self.text()[-2000:]}")

    def no_errors(self) -> None:
        errors = [e.text for e in self.by_css('[data-testid="stException"]')]
        assert not errors, f"a traceback reached the page: {errors}"
        alerts = [e.text for e in self.by_css('[data-testid="stAlertContentError"]')]
        assert not alerts, f"error messages on the page: {alerts}"

    def button(self, label: str):
        for b in self.by_css("button"):
            lines = [line.strip() for line in b.text.strip().splitlines()]
            # Buttons read "<icon name>\n<label>\n<shortcut>": match the label line.
            if any(line.startswith(label) for line in lines[:2] if line) and b.is_displayed():
                return b
        raise AssertionError(f"no button {label!r}; buttons: {[b.text for b in self.by_css('button')]}")

    def click(self, element) -> None:
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        time.sleep(0.2)
        self.d.execute_script("arguments[0].click();", element)

    def real_click(self, element) -> None:
        """A real mouse click (react-aria widgets such as tabs ignore a scripted element.click())."""
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        time.sleep(0.2)
        element.click()

    def tab(self, title: str) -> None:
        for _ in range(5):
            tabs = [t for t in self.by_css('[role="tab"]') if title in t.text]
            if tabs:
                self.real_click(tabs[0])
                time.sleep(0.5)
                if tabs[0].get_attribute("aria-selected") == "true":
                    return
            time.sleep(0.5)
        raise AssertionError(f"could not open the tab {title!r}")

    def nav(self, title: str) -> None:
        for a in self.by_css('[data-testid="stSidebar"] a'):
            if a.text.strip().splitlines()[-1:] == [title]:
                self.click(a)
                self.idle()
                return
        raise AssertionError(f"no page link {title!r}")

    def metric(self, label: str) -> str:
        for m in self.by_css('[data-testid="stMetric"]'):
            lab = m.find_elements("css selector", '[data-testid="stMetricLabel"]')
            if lab and lab[0].text.strip().startswith(label):
                return m.find_element("css selector", '[data-testid="stMetricValue"]').text
        raise AssertionError(f"no metric {label!r}")

    def slider(self, label: str):
        for s in self.by_css('[data-testid="stSlider"]'):
            if label in s.text:
                return s.find_element("css selector", 'input[type="range"]')
        raise AssertionError(f"no slider {label!r}")

    def scroll_top(self) -> None:
        self.d.execute_script(
            "for (const el of document.querySelectorAll('[data-testid=\"stMain\"], section.main, .main')) el.scrollTo(0, 0);"
            "window.scrollTo(0, 0);"
        )
        time.sleep(0.3)

    def scroll_to(self, text: str) -> None:
        """Scroll the main area so that the first heading/paragraph containing ``text`` is at the top."""
        found = self.d.execute_script(
            "const t = arguments[0];"
            'const els = [...document.querySelectorAll(\'[data-testid="stMain"] h1, [data-testid="stMain"] h2,'
            ' [data-testid="stMain"] h3, [data-testid="stMain"] h5, [data-testid="stMain"] p,'
            ' [data-testid="stMain"] label\')];'
            "const el = els.find(e => e.innerText && e.innerText.includes(t));"
            "if (el) { el.scrollIntoView({block: 'start'}); return true; } return false;",
            text,
        )
        assert found, f"nothing to scroll to: {text!r}"
        time.sleep(0.5)

    def shot(self, name: str, readme_name: str | None = None) -> Path:
        """Save artifacts/screenshots/<name>.png; with SOFTPATCH_UPDATE_SCREENSHOTS=1 also
        assets/screenshots/<readme_name>.png for the README."""
        path = SHOTS / f"{name}.png"
        time.sleep(0.8)  # let images and plots finish painting
        self.d.save_screenshot(str(path))
        assert path.stat().st_size > 10_000, f"screenshot {name} looks empty"
        if readme_name and os.environ.get("SOFTPATCH_UPDATE_SCREENSHOTS") == "1":
            README_SHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, README_SHOTS / f"{readme_name}.png")
        return path


# ------------------------------------------------------------------------------------------------ the flow


def test_demo_flow_in_a_real_browser(server, driver) -> None:
    from selenium.webdriver.common.keys import Keys

    app = App(driver, server)
    driver.get(server)
    app.wait_text(r"Training folder")
    app.idle()
    body = app.wait_text(r"softpatch demo")
    assert "34 training images" in body and "20 test images" in body
    app.no_errors()
    app.shot("01_data", "data")

    app.nav("Denoise")
    app.wait_text(r"Fit SoftPatch on 34 training images")
    app.click(app.button("Fit SoftPatch on 34 training images"))
    app.wait_text(r"Demo check", timeout=TIMEOUT)
    app.idle()
    app.no_errors()
    assert "4 of the 4 planted defective images" in app.text()
    before = app.metric("Patches removed")
    app.scroll_top()
    app.shot("02_denoise_controls", "denoise_controls")

    from selenium.webdriver.common.action_chains import ActionChains

    thumb = app.slider("tau")
    driver.execute_script("arguments[0].focus();", thumb)
    ActionChains(driver).send_keys(*([Keys.ARROW_LEFT] * 10)).perform()
    app.idle()
    after = app.wait_text(r"Patches removed") and app.metric("Patches removed")
    assert after != before, f"moving tau did not change the removed count ({before} -> {after})"
    app.no_errors()
    app.scroll_to("Patch outlier scores")
    app.shot("02_denoise", "denoise")

    driver.execute_script("document.activeElement && document.activeElement.blur();")
    open_buttons = [b for b in app.by_css("button") if "Open" in b.text.strip().splitlines()]
    assert open_buttons, "no 'Open' buttons under the ranked images"
    app.click(open_buttons[0])
    app.wait_text(r"Removed patches \(red\)")
    app.idle()
    app.shot("03_denoise_large_view", "denoise_large_view")
    webdriver_body = app.by_css("body")[0]
    webdriver_body.send_keys(Keys.ESCAPE)
    time.sleep(0.5)
    closes = app.by_css('[data-testid="stDialog"] button[aria-label="Close"]')
    if closes:
        app.click(closes[0])
    app.idle()

    app.nav("Review")
    app.wait_text(r"reviewed")
    app.click(app.button("Defective"))
    app.idle()
    app.wait_text(r"1 of \d+ reviewed")
    app.no_errors()
    app.scroll_top()
    app.shot("04_review", "review")

    app.nav("Coreset")
    app.wait_text(r"Patches in the memory bank")
    app.idle()
    deadline = time.monotonic() + TIMEOUT
    while not app.by_css(".js-plotly-plot") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert app.by_css(".js-plotly-plot"), "the coreset plot did not appear"
    app.idle()
    app.no_errors()
    app.scroll_to("Patches in the memory bank")
    app.shot("05_coreset", "coreset")
    # Drag a box over the middle of the map: the selected patches appear as a gallery below it.
    from selenium.webdriver.common.action_chains import ActionChains

    drag = app.by_css(".js-plotly-plot .nsewdrag")
    if drag:
        box = drag[0]
        w, h = box.size["width"], box.size["height"]
        actions = ActionChains(driver).move_to_element_with_offset(box, -w // 6, -h // 6).click_and_hold()
        for _ in range(6):
            actions.move_by_offset(w // 18, h // 18)
        actions.release().perform()
        app.idle()
        app.no_errors()
        body = app.text()
        match = re.search(r"Selected patches \((\d+)\)", body)
        if match and int(match.group(1)) > 0:
            app.scroll_to("Hover a dot")
            app.shot("05_coreset_selection", "coreset_selection")

    app.nav("Detect")
    app.click(app.button("Score 20 images"))
    app.wait_text(r"How well are defects found", timeout=TIMEOUT)
    app.idle()
    app.no_errors()
    assert "PatchCore" in app.text()
    app.scroll_to("Heatmap opacity")
    app.shot("06_detect", "detect")
    app.scroll_to("How well are defects found")
    app.shot("06_detect_metrics", "detect_metrics")

    app.nav("Deploy")
    app.wait_text(r"False-alarm rate")
    app.idle()
    app.no_errors()
    app.shot("07_deploy", "deploy")


BATTERY = REPO.parent / "shared" / "data" / "battery_weld"
BATTERY_PICKS = ("1-+_row0_0.png", "2-l4_row0_135.png")


def test_battery_weld_walkthrough(server, driver) -> None:
    """The README walk-through on real data: a server folder, two defective images added, found on top."""
    from selenium.webdriver.common.keys import Keys

    if not BATTERY.is_dir():
        pytest.skip(f"real data not found at {BATTERY}")
    app = App(driver, server)
    driver.get(server)  # a fresh browser session
    app.wait_text(r"Training folder")
    app.idle()
    radios = [r for r in app.by_css('[data-testid="stRadio"] label') if r.text.strip() == "A folder on the server"]
    app.real_click(radios[0])
    app.idle()
    box = app.by_css('input[aria-label="Folder path on the server"]')[0]
    box.send_keys(str(BATTERY / "train" / "good"), Keys.ENTER)
    app.idle()
    app.click(app.button("Load this training folder"))
    app.wait_text(r"Loaded 37 training images")
    app.idle()
    app.tab("Add training images")
    area = app.by_css('textarea[aria-label^="…or paths on the server"]')[0]
    area.send_keys("\n".join(str(BATTERY / "test" / "defective" / p) for p in BATTERY_PICKS))
    area.send_keys(Keys.TAB)
    app.idle()
    app.click(app.button("Add to the training set"))
    app.wait_text(r"Added 2 images to the training set \(39 in all\)")
    app.idle()
    app.no_errors()

    app.nav("Denoise")
    size = next(s for s in app.by_css('[data-testid="stSelectbox"]') if "Image size" in s.text)
    field = size.find_element("css selector", "input")
    app.click(field)
    field.send_keys("128/112")
    time.sleep(0.5)
    field.send_keys(Keys.ENTER)
    app.idle()
    app.click(app.button("Fit SoftPatch on 39 training images"))
    app.wait_text(r"Patches removed", timeout=TIMEOUT)
    app.idle()
    app.no_errors()
    body = app.text()
    # Both added defective images are among the three most suspicious (the other one is 4--5.png, a
    # "good" image with a large bright weld blob that a QA engineer should look at anyway).
    top3 = body[body.find("#1 · ") : body.find("#4 · ")]
    assert all(f"added/{p}" in top3 for p in BATTERY_PICKS), top3
    app.scroll_to("Training images ranked by suspicion")
    app.shot("08_battery_weld_ranking", "battery_weld_ranking")

    # Leakage and one threshold: the category's test split holds the two added images (and 7 of train/good).
    app.nav("Data")
    app.tab("Test folder (optional)")
    radios = [
        r
        for r in app.by_css('[data-testid="stRadio"] label')
        if r.text.strip() == "A folder on the server" and r.is_displayed()
    ]
    app.real_click(radios[0])
    app.idle()
    box = next(b for b in app.by_css('input[aria-label="Folder path on the server"]') if b.is_displayed())
    box.send_keys(str(BATTERY), Keys.ENTER)
    app.idle()
    app.click(app.button("Load this test folder"))
    body = app.wait_text(r"Leakage: \d+ test images are also in the training folder")
    app.idle()
    app.no_errors()
    warning = body[body.find("Leakage:") :][:2000]
    assert all(p in warning for p in BATTERY_PICKS), warning
    app.scroll_to("Duplicates and leakage")
    app.shot("09_battery_weld_leakage")

    app.nav("Detect")
    app.click(app.button("Score 128 images"))
    app.wait_text(r"How well are defects found", timeout=TIMEOUT)
    app.idle()
    app.no_errors()
    assert re.search(r"Metrics on \d+ of 128 images \(leaked copies left out\)", app.text())
    threshold = app.metric("Threshold")
    assert re.fullmatch(r"\d+\.\d{4}", threshold), threshold
    assert f"Threshold: {threshold}" in app.text()  # the sidebar tells the same
    app.nav("Deploy")
    body = app.wait_text(r"Threshold \d+\.\d{4} — ")
    app.idle()
    app.no_errors()
    assert f"Threshold {threshold} — From good training images alone" in body
    assert re.search(r"false-alarm rate on new good parts is at most \d+\.\d%", body)
    app.shot("10_battery_weld_deploy")


def test_a_refresh_restores_the_project(server, driver) -> None:
    """Mid-work refresh: the page comes back with the same project id, the fitted model, labels and threshold."""
    from urllib.parse import parse_qs, urlparse

    from selenium.webdriver.common.keys import Keys

    def project_id() -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ids = parse_qs(urlparse(driver.current_url).query).get("project")
            if ids:
                return ids[0]
            time.sleep(0.3)
        raise AssertionError(f"no project id in the address: {driver.current_url}")

    app = App(driver, server)
    driver.get(server)  # a fresh browser session: a new project
    app.wait_text(r"Training folder")
    app.idle()
    pid = project_id()
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", pid), pid

    app.nav("Denoise")
    app.click(app.button("Fit SoftPatch on 34 training images"))
    app.wait_text(r"Demo check", timeout=TIMEOUT)
    app.idle()
    app.nav("Review")
    app.wait_text(r"reviewed")
    app.click(app.button("Defective"))
    app.idle()
    app.wait_text(r"1 of \d+ reviewed")
    app.nav("Deploy")
    app.wait_text(r"How to choose the threshold")
    by_hand = [r for r in app.by_css('[data-testid="stRadio"] label') if r.text.strip() == "By hand"]
    app.real_click(by_hand[0])  # the default is the threshold from good images alone
    app.idle()
    box = app.by_css('input[aria-label="Threshold"]')[0]
    app.click(box)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("3.25", Keys.ENTER)
    app.idle()
    app.no_errors()
    assert project_id() == pid  # the page changes kept the id in the address

    driver.refresh()  # mid-work: everything above must come back without fitting again
    app.wait_text(r"How to choose the threshold")
    app.idle()
    app.no_errors()
    assert project_id() == pid
    body = app.wait_text(r"Model: fitted")
    assert "softpatch demo" in body and "does not exist" not in body and "partly restored" not in body
    assert app.by_css('input[aria-label="Threshold"]')[0].get_attribute("value") == "3.2500"
    app.shot("09_restored_deploy")
    app.nav("Review")
    app.wait_text(r"1 of \d+ reviewed")
    app.no_errors()
    assert project_id() == pid
    app.shot("09_restored_review")
