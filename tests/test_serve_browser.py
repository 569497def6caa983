"""The page at / in Debian's headless Chromium (driven by Selenium through chromium-driver): upload a
magnetic_tile defect image, see its score and heatmap, move the sliders, save a screenshot."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed")
pytest.importorskip("python_multipart", reason="the serve extra is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from conftest import FAST  # noqa: E402
from padim import PaDiM  # noqa: E402
from padim.data.synthetic import make_synthetic_category  # noqa: E402
from padim.jobs.runs import fit_category  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_process import Server, get  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"
for candidate in (Path("../shared/datasets/magnetic_tile"), Path("/work/shared/datasets/magnetic_tile")):
    if not MAGNETIC_TILE.is_dir() and candidate.is_dir():
        MAGNETIC_TILE = candidate.resolve()

pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="Debian's chromium and chromium-driver are not installed "
                                       "(apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def defect_image(tmp_path_factory):
    """A magnetic_tile defect image (a synthetic one when the data set is absent)."""
    found = sorted((MAGNETIC_TILE / "test" / "blowhole").glob("*.jpg")) if MAGNETIC_TILE.is_dir() else []
    if found:
        return found[0]
    root = tmp_path_factory.mktemp("defects")
    make_synthetic_category(root, name="fabric", n_train=2, n_test_good=1, n_test_per_defect=1, size=64)
    return sorted((root / "fabric" / "test").rglob("*.png"))[-1]


@pytest.fixture(scope="module")
def calibrated_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic_category(root, name="fabric", n_train=44, n_test_good=1, n_test_per_defect=1, size=64)
    path = tmp_path_factory.mktemp("model") / "tile.safetensors"
    model = fit_category(root, "fabric", path, note=lambda _: None, **FAST)
    assert model.pixel_threshold_ is not None
    return path


def chromium(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1366,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)


def predict_requests(url: str) -> float:
    text = get(url + "/metrics")[1]
    found = re.search(r'^padim_requests_total\{method="POST",route="/models/\{name\}/predict",status="200"\} (\S+)$',
                      text, re.M)
    return float(found.group(1)) if found else 0.0


def test_page_scores_an_upload_and_redraws_at_new_thresholds(calibrated_model, defect_image, tmp_path):
    expected = PaDiM.load(calibrated_model, device="cpu").predict([defect_image])
    with Server([calibrated_model], tmp_path) as server:
        driver = chromium(tmp_path)
        try:
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
            driver.find_element(By.ID, "files").send_keys(str(defect_image))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card .score"))
            card = driver.find_element(By.CSS_SELECTOR, "#results .card")
            assert card.find_element(By.CSS_SELECTOR, ".name").text == defect_image.name
            shown = float(card.find_element(By.CSS_SELECTOR, ".score").text)
            assert shown == pytest.approx(float(expected.scores[0]), rel=1e-3)
            assert float(card.find_element(By.CSS_SELECTOR, ".p-value").text) == pytest.approx(expected.p_values[0], rel=1e-2)
            overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) > 0
            decision = card.find_element(By.CSS_SELECTOR, ".decision")
            # readable on a laptop screen (1366 x 900): a picture of a useful size, and the decision on
            # screen without scrolling
            assert max(overlay.size["width"], overlay.size["height"]) >= 200
            assert driver.execute_script("return arguments[0].getBoundingClientRect().bottom <= window.innerHeight",
                                         decision)
            assert decision.text.lower() == ("anomalous" if expected.labels[0] else "good")
            canvas = card.find_element(By.TAG_NAME, "canvas")
            cells = lambda: int(canvas.get_attribute("data-defect-cells"))  # noqa: E731
            at_model_threshold = cells()
            # the page's map is 8-bit: cells within a quantisation step of the threshold may differ
            assert abs(at_model_threshold - int((expected.maps[0] >= expected.pixel_threshold).sum())) <= 64 * 64 * 0.02
            requests = predict_requests(server.url)

            # keyboard only: the sliders move with Home / End and redraw without asking the server
            image_slider = driver.find_element(By.ID, "image-threshold")
            image_slider.send_keys(Keys.HOME)
            assert decision.text.lower() == "anomalous"  # every score >= 0
            image_slider.send_keys(Keys.END)
            assert decision.text.lower() == "good"  # the top of the scale is above the score
            pixel_slider = driver.find_element(By.ID, "pixel-threshold")
            pixel_slider.send_keys(Keys.HOME)
            assert cells() == 64 * 64  # threshold 0: every cell of the map is outlined
            pixel_slider.send_keys(Keys.END)
            assert cells() == 0
            assert predict_requests(server.url) == requests  # redrawn in the page, no new request
            driver.find_element(By.ID, "reset").click()
            assert cells() == at_model_threshold
            assert "manual" not in driver.find_element(By.ID, "image-threshold-source").text

            shot = tmp_path / "serve_page.png"
            assert driver.save_screenshot(str(shot))
            picture = np.asarray(Image.open(shot).convert("RGB")).astype(int)
            assert picture.shape[1] >= 1300
            reddish = (picture[..., 0] > 180) & (picture[..., 1] < 90) & (picture[..., 2] < 90)
            blueish = (picture[..., 2] > 150) & (picture[..., 0] < 60)
            assert reddish.sum() > 50 or blueish.sum() > 50  # the jet heatmap is on screen
        finally:
            driver.quit()


def test_page_shows_a_banner_while_a_drift_alarm_is_on(calibrated_model, tmp_path):
    """Pictures of another kind (noise) into the fabric model: the drift alarm fires, the page says so
    in a banner naming the model and the streams; after a reset the banner is gone."""
    import http.client
    import io

    def post(port, path, body=b"", content_type="application/octet-stream"):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request("POST", path, body, {"Content-Type": content_type})
            answer = connection.getresponse()
            return answer.status, answer.read()
        finally:
            connection.close()

    with Server([calibrated_model, "--max-batch", "4"], tmp_path) as server:
        rng = np.random.default_rng(0)
        for i in range(30):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
            body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"n.png\"\r\n\r\n"
                    + buffer.getvalue() + b"\r\n--b--\r\n")
            assert post(server.port, "/models/tile/predict", body, "multipart/form-data; boundary=b")[0] == 200
            if get(server.url + "/models/tile")[1]["drift"]["alarm"]:
                break
        streams = get(server.url + "/models/tile")[1]["drift"]["streams_alarmed"]
        assert streams  # the alarm is on
        driver = chromium(tmp_path)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(server.url + "/")
            wait.until(lambda d: d.find_element(By.ID, "drift-banner").is_displayed())
            banner = driver.find_element(By.ID, "drift-banner")
            assert banner.get_attribute("role") == "alert"
            assert "Drift alarm on model tile" in banner.text and "stream " + " and ".join(streams) in banner.text
            assert post(server.port, "/models/tile/drift/reset")[0] == 200
            driver.get(server.url + "/")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
            assert not driver.find_element(By.ID, "drift-banner").is_displayed()
        finally:
            driver.quit()
