"""The web app in a real headless browser (Debian's chromium + chromium-driver through Selenium; `.ci/run`
installs them): load the page, upload an example photo, type the prompts, click Run, and check that the
edit is displayed — the image the browser decoded is the edit_0.png the run wrote, at the working size —
then that a refused prompt shows the engine's one line in the page. A screenshot of the page is saved
in pytest's tmp_path and, when S2EDIT_ARTIFACTS names a folder, there too.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from editkit.errors import InputError
from s2edit.app import ui
from s2edit.core.tokenizer import clip_tokenizer, token_ids

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "examples" / "chelsea.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,2300"]
# the pixels of an <img> as the browser decoded them (RGBA, row-major)
READ_PIXELS = """
const img = arguments[0], canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const context = canvas.getContext('2d');
context.drawImage(img, 0, 0);
return Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data);
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    path = shutil.which(name) or shutil.which(f"/usr/bin/{name}")
    assert path, f"'{name}' is missing: apt-get install chromium chromium-driver (.ci/run installs them)"
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> ui.EditingApp:
    workdir = tmp_path_factory.mktemp("browser_app")
    settings = ui.AppSettings(model="tiny", workdir=workdir, resolution=128)
    editing_app = ui.EditingApp(settings)
    editing_app.launch(port=free_port(), block=False)
    yield editing_app
    editing_app.blocks.close()


@pytest.fixture
def browser(tmp_path: Path) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = executable("chromium")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable("chromedriver")), options=options)
    yield driver
    driver.quit()


def save_screenshot(driver: WebDriver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "the browser made no screenshot"
    artifacts = os.environ.get("S2EDIT_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


def loaded_image(driver: WebDriver, selector: str) -> object:
    """The first <img> under `selector` that the browser has fully decoded, else False (for waits)."""
    for image in driver.find_elements(By.CSS_SELECTOR, f"{selector} img"):
        try:
            if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image):
                return image
        except WebDriverException:  # replaced while we looked
            continue
    return False


def edit_or_error(driver: WebDriver) -> object:
    """The displayed edit, or False while the run goes on; a toast (an error) fails the test at once."""
    toasts = [t.text for t in driver.find_elements(By.CSS_SELECTOR, '[data-testid="toast-body"]')]
    assert not toasts, f"the page shows an error instead of the edit: {toasts}"
    return loaded_image(driver, "#edit-result")


def type_into(driver: WebDriver, elem_id: str, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    box.send_keys(text)


def test_edit_in_the_browser_shows_the_edit_and_refusals(app, browser, tmp_path) -> None:
    browser.get(app.blocks.local_url)
    wait = WebDriverWait(browser, 60)

    # 1. upload an example photo and type the prompts, as a user does
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
    upload.send_keys(str(IMAGE))
    preview = wait.until(lambda d: loaded_image(d, "#input-image"))
    # uploaded: the preview is served back by the app (the upload finished before Run is clicked)
    wait.until(lambda d: "/gradio_api/file=" in (preview.get_attribute("src") or ""))
    type_into(browser, "source-prompt", "a photo of a cat")
    type_into(browser, "target-prompt", "a photo of a tiger")

    # 2. Run; the edit appears
    started = time.monotonic()
    browser.find_element(By.CSS_SELECTOR, "#run-edit").click()
    shown = WebDriverWait(browser, 180, poll_frequency=0.2).until(edit_or_error)
    seconds = time.monotonic() - started
    width, height, client_width = browser.execute_script(
        "const i = arguments[0]; return [i.naturalWidth, i.naturalHeight, i.clientWidth]", shown)
    assert (width, height) == (128, 128)  # the working size of --resolution 128
    assert shown.is_displayed() and client_width > 0
    runs = sorted((app.settings.workdir / "edits").iterdir())
    assert len(runs) == 1, runs
    with Image.open(runs[0] / "edit_0.png") as written:
        expected = np.asarray(written.convert("RGBA"))
    decoded = np.asarray(browser.execute_script(READ_PIXELS, shown), dtype=np.uint8).reshape(expected.shape)
    assert (decoded == expected).all()  # the page shows this run's edit, pixel for pixel
    summary = browser.find_element(By.CSS_SELECTOR, "#edit-summary").text
    assert "virtual edit in" in summary and "seed 0" in summary and "infer.py" in summary
    assert "report.json" in browser.find_element(By.CSS_SELECTOR, "#report-file").text
    save_screenshot(browser, tmp_path, "app_edit.png")

    # 3. a prompt over 77 tokens: the engine's one line in the page, no traceback
    long_target = "a photo of a " + "very " * 80 + "tiger"
    with pytest.raises(InputError) as refused:
        token_ids(clip_tokenizer(), long_target)
    type_into(browser, "target-prompt", long_target)
    browser.find_element(By.CSS_SELECTOR, "#run-edit").click()
    message = str(refused.value)
    WebDriverWait(browser, 60).until(lambda d: message in d.find_element(By.TAG_NAME, "body").text)
    save_screenshot(browser, tmp_path, "app_refusal.png")
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in page and page.count(message) == 1
    assert len(list((app.settings.workdir / "edits").iterdir())) == 1  # a refused edit writes nothing
    assert seconds < 180
