"""The review page in a real headless Chromium (Debian's chromium, driven by Playwright) against a running service:
sign in, create a project, drop exemplars, fit and watch it, the threshold view, inspect, the review queue from the
keyboard. Screenshots go under the pytest temp root (artifacts*/); scripts/page_screenshot.py copies them into docs/."""

import re
import shutil
from pathlib import Path

import httpx
import pytest
from service_helpers import Server, textile_bytes

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps"]


TIMEOUT = 60  # seconds a request may take: httpx's default 5 s runs out on a loaded 2-core machine


def get(url, **kwargs):
    return httpx.get(url, timeout=TIMEOUT, **kwargs)


def post(url, **kwargs):
    return httpx.post(url, timeout=TIMEOUT, **kwargs)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """Where the screenshots go: under pytest's temp root, never the source tree (a checkout may be read-only)."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "the page tests need Debian's chromium: apt-get install -y chromium (.ci/run)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "data")
    s.data_dir.mkdir(parents=True)
    s.token_value = s.token("--name", "inspector")
    s.start()
    yield s
    s.stop()


def write_images(folder: Path, kind: str, start: int, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in textile_bytes(kind, start, n):
        (folder / name).write_bytes(data)
        out.append(str(folder / name))
    return out


def drop_files(page, selector: str, paths: list[str]) -> None:
    """A real drag and drop: the files go into a DataTransfer dispatched as drop events on the zone."""
    payload = [{"name": Path(p).name, "b64": __import__("base64").b64encode(Path(p).read_bytes()).decode()}
               for p in paths]
    page.evaluate("""([selector, files]) => {
        const dt = new DataTransfer();
        for (const f of files) {
            const bytes = Uint8Array.from(atob(f.b64), c => c.charCodeAt(0));
            dt.items.add(new File([bytes], f.name, { type: "image/jpeg" }));
        }
        const zone = document.querySelector(selector);
        zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true }));
        zone.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
    }""", [selector, payload])


def test_the_whole_loop_in_a_real_browser(browser, server, tmp_path, artifacts):
    good = write_images(tmp_path / "good", "nominal", 0, 15)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")

    # a wrong token is refused; the right one signs in and never shows up in a URL
    page.fill("#token", "fv_wrong")
    page.click("#sign-in")
    page.wait_for_selector("#signin-error:has-text('not valid')")
    page.fill("#token", server.token_value)
    page.click("#sign-in")
    page.wait_for_selector("#app-view:not([hidden])")

    # create a project
    page.click("#new-project-box summary")
    page.fill("#new-project input[name=name]", "fabric line")
    page.select_option("#new-project select[name=task]", "anomaly")
    page.fill("#new-project input[name=backbone]", "texture")
    page.click("#create-project")
    page.wait_for_selector("#project-title:has-text('fabric line')")
    project_id = get(f"{server.url}/v1/projects",
                     headers={"Authorization": f"Bearer {server.token_value}"}).json()[0]["id"]

    # drag and drop 12 good images, and choose 3 more through the file input
    drop_files(page, "#drop", good[:12])
    page.wait_for_selector("#exemplar-counts:has-text('good: 12')", timeout=60_000)
    page.set_input_files("#exemplar-files", good[12:])
    page.wait_for_selector("#exemplar-counts:has-text('good: 15')", timeout=60_000)

    # fit and watch the job
    page.click("button[data-tab=train]")
    page.click("#fit")
    page.wait_for_selector("#job-progress:has-text('done 100%')", timeout=180_000)
    page.wait_for_selector("#versions tbody tr:has-text('v1 (active)')")

    # inspect a defective image: decision, label, heat map over the image, zoom
    page.click("button[data-tab=inspect]")
    defect = write_images(tmp_path / "defect", "local", 0, 1)[0]
    page.set_input_files("#inspect-file", defect)
    page.wait_for_selector("#decision:has-text('reject')", timeout=60_000)
    assert page.inner_text("#label") == "defect"
    assert re.fullmatch(r"\d+ regions? \(outlined\), largest \d+ px \(.+ % of the image\) at x \d+, y \d+, "
                        r"\d+ × \d+ px", page.inner_text("#regions")), page.inner_text("#regions")
    # Poll from Python: page.wait_for_function compiles its predicate inside the page, which the service's
    # Content-Security-Policy (no 'unsafe-eval') refuses whenever the first check is not already true.
    for _ in range(600):
        if page.eval_on_selector("#inspect-image", "img => img.complete && img.naturalWidth > 0"):
            break
        page.wait_for_timeout(50)
    else:
        raise AssertionError("the inspected image never loaded")
    page.hover("#inspect-image")
    page.mouse.wheel(0, -300)
    assert "scale(1.2" in page.get_attribute("#inspect-image", "style") or "scale(1.4" in \
        page.get_attribute("#inspect-image", "style")
    page.screenshot(path=str(artifacts / "page-inspect.png"), full_page=True)

    # a few more predictions through the API: their scores join the threshold view
    h = {"Authorization": f"Bearer {server.token_value}"}
    for name, data in textile_bytes("nominal", 400, 6):
        post(f"{server.url}/v1/projects/{project_id}/predict", files={"file": (name, data)}, headers=h)

    # the threshold view: rates computed in the page as the slider moves, no request sent
    page.click("button[data-tab=threshold]")
    page.wait_for_selector("#threshold-counts:has-text('15 good calibration images, 7 recent predictions')")
    before = len(requests)
    good = get(f"{server.url}/v1/projects/{project_id}/models/1", headers=h).json()["calibration_scores"]
    low = page.get_attribute("#threshold", "min")
    page.fill("#threshold", low)  # (nearly) every good calibration image is then over the threshold
    page.dispatch_event("#threshold", "input")
    at = float(page.input_value("#threshold"))  # the slider's value (a range input keeps 15 digits)
    over = sum(s > at for s in good)
    assert over >= 14 and page.inner_text("#frr").startswith(f"{100 * over / 15:.1f}% of 15")
    high = page.get_attribute("#threshold", "max")
    page.fill("#threshold", high)
    page.dispatch_event("#threshold", "input")
    assert page.inner_text("#frr").startswith("0.0% of 15")
    assert len(requests) == before  # computed in the page
    page.screenshot(path=str(artifacts / "page-threshold.png"), full_page=True)

    # the monitor: blurred images (a camera out of focus) through the API raise a drift alarm; the tab shows the
    # counts, draws both charts and takes the acknowledgement
    import io

    from PIL import Image, ImageFilter

    blurred = []
    for name, data in textile_bytes("nominal", 420, 30):
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).filter(ImageFilter.GaussianBlur(2)).save(buf, format="JPEG", quality=95)
        blurred.append(("files", (f"blur-{name}", buf.getvalue(), "image/jpeg")))
    assert post(f"{server.url}/v1/projects/{project_id}/predict-batch", files=blurred, headers=h).status_code == 200
    page.click("button[data-tab=monitor]")
    page.wait_for_selector("#monitor-summary:has-text('37 predictions')")
    page.select_option("#monitor-since", "")
    page.wait_for_selector("#alarm-list li:has-text('martingale') button.ack")
    for canvas in ("#yield-chart", "#score-chart"):
        painted = page.eval_on_selector(canvas, "c => c.getContext('2d').getImageData(0, 0, c.width, c.height)"
                                                ".data.filter((v, i) => i % 4 === 3 && v > 0).length")
        assert painted > 500, canvas
    page.screenshot(path=str(artifacts / "page-monitor.png"), full_page=True)
    alarm_id = int(page.get_attribute("#alarm-list li:has-text('martingale')", "data-alarm"))
    page.click(f"#alarm-list li[data-alarm='{alarm_id}'] button.ack")
    page.wait_for_selector(f"#alarm-list li[data-alarm='{alarm_id}']:has-text('acknowledged')")
    alarms = get(f"{server.url}/v1/projects/{project_id}/monitor", headers=h).json()["alarms"]
    assert next(a for a in alarms if a["id"] == alarm_id)["acknowledged_by"] is not None
    page.click("#monitor-reset")  # after the fix: the drift test starts again, recorded with the token
    page.wait_for_selector("#alarm-list li:has-text('monitor reset by inspector')")
    with page.expect_download() as download:  # the shift report, fetched with the token, saved as one file
        page.click("#shift-report")
    report = Path(download.value.path()).read_text()
    assert "Shift report: fabric line" in report and report.count('<img src="data:image/jpeg;base64,') >= 25

    assert not any(server.token_value in url for url in requests)  # the token never travels in a URL


def test_review_queue_is_worked_from_the_keyboard(browser, server, tmp_path, artifacts):
    """A project whose review band puts every prediction in review: '2' corrects to defect, 'a' accepts the guess."""
    h = {"Authorization": f"Bearer {server.token_value}"}
    p = post(f"{server.url}/v1/projects", json={"name": "all review", "task": "anomaly", "backbone": "texture",
                                                "params": {"target_false_reject": 0.2, "review_band": 100}},
             headers=h).json()
    for name, data in textile_bytes("nominal", 0, 10):
        post(f"{server.url}/v1/projects/{p['id']}/exemplars", files={"file": (name, data)},
             data={"label": "good"}, headers=h)
    job = post(f"{server.url}/v1/projects/{p['id']}/fit", headers=h).json()
    for _ in range(600):
        if get(f"{server.url}/v1/jobs/{job['job_id']}", headers=h).json()["state"] == "done":
            break
        __import__("time").sleep(0.2)
    for name, data in textile_bytes("nominal", 500, 2) + textile_bytes("local", 5, 1):
        r = post(f"{server.url}/v1/projects/{p['id']}/predict", files={"file": (name, data)}, headers=h).json()
        assert r["decision"] == "review"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url + "/")
    page.fill("#token", server.token_value)
    page.click("#sign-in")
    page.click("#project-list li:has-text('all review')")
    page.wait_for_selector("#review-count:has-text('(3)')")
    page.click("button[data-tab=review]")
    page.wait_for_selector("#review-position:has-text('1 of 3')")
    page.keyboard.press("j")
    page.wait_for_selector("#review-position:has-text('2 of 3')")
    page.keyboard.press("k")
    page.wait_for_selector("#review-position:has-text('1 of 3')")
    corrected = page.inner_text("#review-position").split(": ", 1)[1]  # "1 of 3: FILENAME"
    page.keyboard.press("2")  # correct to the second class: defect
    page.wait_for_selector("#review-position:has-text('1 of 2')")
    accepted, guess = page.inner_text("#review-position").split(": ", 1)[1], page.inner_text("#review-guess")
    assert guess in ("good", "defect") and accepted != corrected
    page.keyboard.press("a")  # accept the model's guess
    page.wait_for_selector("#review-position:has-text('1 of 1')")
    if guess == "good":  # a good image joins PatchCore's memory in an update job; the page reports the new version
        page.wait_for_selector("#review-status:has-text('good - model updated to v2')", timeout=60_000)
    else:
        page.wait_for_selector("#review-status:has-text(': defect')")
    page.screenshot(path=str(artifacts / "page-review.png"), full_page=True)
    reviewed = {r["filename"]: r["reviewed_label"] for r in
                get(f"{server.url}/v1/projects/{p['id']}/predictions", headers=h).json()["items"]
                if r["reviewed_label"]}
    # Each image got its own answer: the one corrected with '2' is a defect, the one accepted with 'a' the guess.
    assert reviewed == {corrected: "defect", accepted: guess}
    assert (artifacts / "page-review.png").stat().st_size > 10_000
