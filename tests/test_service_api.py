"""The inspection service's API end to end, against SQLite and a real PostgreSQL server: auth, projects, exemplars,
fits in the worker, model versions, predictions and their audit trail, the review loop, hostile uploads."""

import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import fresh_postgres_database, postgres_server_url, textile_bytes

from fewvision.service.app import create_app
from fewvision.service.core import Settings


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request, tmp_path):
    db = fresh_postgres_database(postgres_server_url()) if request.param == "postgresql" else None
    settings = Settings(tmp_path / "data", db, max_upload_bytes=2_000_000, max_pixels=20_000_000)
    with TestClient(create_app(settings)) as c:
        _, token = c.app.state.service.create_token("tests")
        c.headers["Authorization"] = f"Bearer {token}"
        c.store = request.param
        yield c


def upload(c, project_id, name, data, label="good"):
    return c.post(f"/v1/projects/{project_id}/exemplars", files={"file": (name, data, "image/jpeg")},
                  data={"label": label})


def wait_for(c, job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.fixture
def anomaly_project(client):
    p = client.post("/v1/projects", json={"name": "line 3 fabric", "task": "anomaly", "backbone": "texture",
                                          "params": {"target_false_reject": 0.1, "review_band": 0.15}})
    assert p.status_code == 201, p.text
    p = p.json()
    for name, data in textile_bytes("nominal", 0, 20):
        assert upload(client, p["id"], name, data).status_code == 201
    job = client.post(f"/v1/projects/{p['id']}/fit")
    assert job.status_code == 202
    done = wait_for(client, job.json()["job_id"])
    assert done["state"] == "done" and done["model_version"] == 1 and done["progress"] == 1.0, done
    return p


def test_health_is_open_and_everything_else_needs_a_token(client):
    health = client.get("/v1/health", headers={"Authorization": ""})
    assert health.status_code == 200 and health.json()["store"] == client.store
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer fv_not_a_token"}, {"Authorization": "Basic x"}):
        r = client.get("/v1/projects", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    service = client.app.state.service
    row, token = service.create_token("soon revoked")
    assert client.get("/v1/projects", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    service.revoke_token(row["id"])
    assert client.get("/v1/projects", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert all(len(t["name"]) and "token_hash" not in t for t in service.tokens())


def test_a_project_scoped_token_sees_only_its_project(client):
    a = client.post("/v1/projects", json={"name": "a", "task": "anomaly", "backbone": "texture"}).json()
    b = client.post("/v1/projects", json={"name": "b", "task": "anomaly", "backbone": "texture"}).json()
    _, token = client.app.state.service.create_token("line a", a["id"])
    scoped = {"Authorization": f"Bearer {token}"}
    assert [p["id"] for p in client.get("/v1/projects", headers=scoped).json()] == [a["id"]]
    assert client.get(f"/v1/projects/{a['id']}", headers=scoped).status_code == 200
    r = client.get(f"/v1/projects/{b['id']}", headers=scoped)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert client.post("/v1/projects", json={"name": "c", "task": "anomaly"}, headers=scoped).status_code == 403


def test_projects_are_validated_with_json_errors(client):
    r = client.post("/v1/projects", json={"name": "x", "task": "segmentation"})
    assert r.status_code == 422 and set(r.json()["error"]) == {"code", "message"} and "task" in r.json()["error"]["message"]
    r = client.post("/v1/projects", json={"name": "x", "task": "classification", "classes": [{"name": "only"}]})
    assert r.status_code == 422 and "at least two classes" in r.json()["error"]["message"]
    r = client.post("/v1/projects", json={"name": "x", "task": "anomaly", "method": "magic"})
    assert r.status_code == 422 and "unknown anomaly method" in r.json()["error"]["message"]
    assert client.post("/v1/projects", json={"name": "dup", "task": "anomaly"}).status_code == 201
    assert client.post("/v1/projects", json={"name": "dup", "task": "anomaly"}).status_code == 409
    assert client.get("/v1/projects/999").json() == {"error": {"code": "not_found", "message": "no project 999"}}
    # NUL characters (which PostgreSQL cannot store in text) are refused up front, wherever they hide (schemathesis)
    for body in ({"name": "a\x00b", "task": "anomaly"}, {"name": "c", "task": "anomaly", "params": {"k": ["\x00"]}},
                 {"name": "d", "task": "classification", "classes": [{"name": "a"}, {"name": "b", "description": "\x00"}]}):
        r = client.post("/v1/projects", json=body)
        assert r.status_code == 422 and "NUL character" in r.json()["error"]["message"], r.text
    assert client.get("/v1/jobs/not-a-job%00").json()["error"]["code"] == "not_found"
    assert client.get("/openapi.json").status_code == 200 and "/v1/projects/{project_id}/predict" in \
        client.get("/openapi.json").json()["paths"]


def test_params_backbone_and_method_are_checked_when_set_naming_the_field(client):
    def refused(body, field):
        r = client.post("/v1/projects", content=body if isinstance(body, str) else None,
                        json=None if isinstance(body, str) else body,
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert field in r.json()["error"]["message"], r.text

    base = '{"name": "p", "task": "anomaly", "backbone": "texture", "params": %s}'
    refused(base % '{"review_band": "wide"}', "params.review_band")  # was 201, then every predict a 500
    refused(base % '{"review_band": 1e400}', "params.review_band")  # Python reads 1e400 as infinity
    refused(base % '{"review_band": NaN}', "params.review_band")
    refused(base % '{"target_false_reject": Infinity}', "params.target_false_reject")
    refused(base % '{"target_false_reject": 1.5}', "params.target_false_reject")
    refused(base % '{"coreset_ratio": 0}', "coreset_ratio")  # the head's own check, run at create
    refused(base % '{"coreset_raito": 0.1}', "params.coreset_raito")  # not a setting of PatchCore
    refused({"name": "p", "task": "anomaly", "backbone": "bogus:x"}, "backbone")
    refused({"name": "p", "task": "anomaly", "backbone": "timm:"}, "backbone")
    refused({"name": "p", "task": "classification", "classes": [{"name": "a"}, {"name": "b"}],
             "params": {"accept_classes": ["c"]}}, "params.accept_classes")
    refused(base % '{"tile": 8}', "params.tile")
    refused(base % '{"tile_overlap": 1}', "params.tile_overlap")
    ok = client.post("/v1/projects", json={"name": "p", "task": "anomaly", "backbone": "texture",
                                           "params": {"review_band": 0.1, "coreset_ratio": 0.2, "shots": 4,
                                                      "tile": 256, "tile_overlap": 0.5, "min_region_area": 9}})
    assert ok.status_code == 201, ok.text


def test_a_tiled_project_scores_tiles_and_answers_in_the_images_own_pixels(client, tmp_path):
    """A project with ``tile`` fits a tiled model (the fit's own keyword) and every prediction is the task
    function's row for the stored model: stitched maps, the peak and the regions in the image's pixels."""
    from fewvision.modelfile import load
    from fewvision.tasks.anomaly import score_files

    p = client.post("/v1/projects", json={"name": "wide web", "task": "anomaly", "backbone": "texture",
                                          "params": {"tile": 128, "tile_overlap": 0.0, "target_false_reject": 0.3}})
    assert p.status_code == 201, p.text
    pid = p.json()["id"]
    for name, data in textile_bytes("nominal", 0, 10):  # 8 fit, 2 set the threshold
        assert upload(client, pid, name, data).status_code == 201
    done = wait_for(client, client.post(f"/v1/projects/{pid}/fit").json()["job_id"])
    assert done["state"] == "done", done
    model = load(client.app.state.service.blobs.model_path(pid, 1))
    assert model.decision["tiling"] == {"size": 128, "overlap": 0.0, "score": "tile_max"}
    (name, data), = textile_bytes("local", 0, 1)
    answer = client.post(f"/v1/projects/{pid}/predict", files={"file": (name, data)}).json()
    (tmp_path / name).write_bytes(data)
    want = score_files(model, [tmp_path / name], use_cache=False).rows[0]
    assert answer["score"] == pytest.approx(want["score"], rel=1e-6) and (answer["x"], answer["y"]) == \
        (want["x"], want["y"])
    assert [b["x"] for b in answer["regions"]] == [b["x"] for b in want["regions"]]
    heat = client.get(answer["heatmap_url"])
    assert heat.status_code == 200 and Image.open(io.BytesIO(heat.content)).size == (250, 250)  # the image's own


def test_a_project_is_renamed_re_set_and_deleted_with_its_data(client, anomaly_project):
    pid = anomaly_project["id"]
    (name, data), = textile_bytes("nominal", 600, 1)
    predicted = client.post(f"/v1/projects/{pid}/predict", files={"file": (name, data)}).json()
    assert predicted["heatmap_url"]
    # a bad PATCH changes nothing; a good one applies to the next prediction at once
    assert client.patch(f"/v1/projects/{pid}", json={"params": {"review_band": "wide"}}).status_code == 422
    assert client.get(f"/v1/projects/{pid}").json()["params"]["review_band"] == 0.15
    r = client.patch(f"/v1/projects/{pid}", json={"name": "line 3 fabric (old)", "params": {"review_band": 0.9,
                                                                                          "target_false_reject": 0.1}})
    assert r.status_code == 200 and r.json()["name"] == "line 3 fabric (old)" and not r.json()["needs_refit"]
    again = client.post(f"/v1/projects/{pid}/predict", files={"file": (name, data)}).json()
    assert again["decision"] == "review", again  # within 90 % of the threshold, either side
    assert client.patch(f"/v1/projects/{pid}", json={"params": {"target_false_reject": 0.05}}).json()["needs_refit"]
    # a token of the project cannot delete it; an unlimited one can, and every trace goes
    _, scoped = client.app.state.service.create_token("line 3", pid)
    assert client.delete(f"/v1/projects/{pid}", headers={"Authorization": f"Bearer {scoped}"}).status_code == 403
    data_dir = client.app.state.service.settings.data_dir
    assert list((data_dir / "models" / str(pid)).glob("*.fvm")) and (data_dir / "heatmaps" / str(pid)).is_dir()
    gone = client.delete(f"/v1/projects/{pid}")
    assert gone.status_code == 200 and gone.json()["images_removed"] == 21, gone.text  # 20 to fit + 1 predicted
    assert client.get(f"/v1/projects/{pid}").status_code == 404
    assert client.get(f"/v1/predictions/{predicted['prediction_id']}").status_code == 404
    assert not (data_dir / "models" / str(pid)).exists() and not (data_dir / "heatmaps" / str(pid)).exists()
    assert not [p for p in (data_dir / "images").rglob("*") if p.is_file()]
    assert client.get("/v1/projects", headers={"Authorization": f"Bearer {scoped}"}).status_code == 401  # revoked
    assert client.delete(f"/v1/projects/{pid}").status_code == 404


def test_anomaly_fit_predict_audit_trail_review_and_rollback(client, anomaly_project, monkeypatch):
    pid = anomaly_project["id"]
    import fewvision.tasks.anomaly as anomaly_tasks

    scoring_threads, score_files = set(), anomaly_tasks.score_files

    def recording(*args, **kwargs):
        scoring_threads.add(threading.current_thread().name)
        return score_files(*args, **kwargs)

    monkeypatch.setattr(anomaly_tasks, "score_files", recording)
    models = client.get(f"/v1/projects/{pid}/models").json()
    assert [m["version"] for m in models] == [1] and models[0]["active"]
    assert "set on 20 good images" in models[0]["summary"]["guarantee"]
    detail = client.get(f"/v1/projects/{pid}/models/1").json()
    assert len(detail["calibration_scores"]) == 20 and detail["threshold"] == pytest.approx(
        sorted(detail["calibration_scores"])[-2])  # ceil(21 * 0.9) = 19th of 20

    (name, defect), = textile_bytes("local", 0, 1)
    r = client.post(f"/v1/projects/{pid}/predict", files={"file": (name, defect, "image/jpeg")})
    assert r.status_code == 200, r.text
    one = r.json()
    assert one["decision"] == "reject" and one["label"] == "defect" and one["score"] > one["threshold"]
    assert one["model_version"] == 1 and one["heatmap_url"] == f"/v1/predictions/{one['prediction_id']}/heatmap"
    heat = client.get(one["heatmap_url"])
    assert heat.status_code == 200 and Image.open(io.BytesIO(heat.content)).size == Image.open(io.BytesIO(defect)).size
    # where the defect is: the peak and the regions above the threshold, in the image's pixels, stored and served
    width, height = Image.open(io.BytesIO(defect)).size
    assert one["n_regions"] == len(one["regions"]) >= 1 and one["largest_region_px"] == one["regions"][0]["area_px"]
    assert 0 <= one["x"] < width and 0 <= one["y"] < height
    box = one["regions"][0]
    assert box["x"] <= one["x"] <= box["x"] + box["width"] and box["y"] <= one["y"] <= box["y"] + box["height"]
    assert client.get(f"/v1/predictions/{one['prediction_id']}").json()["regions"] == one["regions"]
    outlined = np.asarray(Image.open(io.BytesIO(heat.content)).convert("RGB"))
    assert (outlined == (255, 0, 255)).all(-1).sum() > 20  # the boxes are drawn on the heat map

    good = textile_bytes("nominal", 100, 12)
    batch = client.post(f"/v1/projects/{pid}/predict-batch", files=[("files", (n, d, "image/jpeg")) for n, d in good])
    assert batch.status_code == 200
    rows = batch.json()["predictions"]
    assert len(rows) == 12 and {r["decision"] for r in rows} <= {"accept", "reject", "review"}
    for r in rows:  # the decision follows the score, the threshold and the review band of 15 %
        near = abs(r["score"] - r["threshold"]) <= 0.15 * r["threshold"]
        assert r["decision"] == ("review" if near else "reject" if r["score"] > r["threshold"] else "accept")

    # Every prediction is recorded once, newest first, paged.
    page = client.get(f"/v1/projects/{pid}/predictions", params={"limit": 5}).json()
    assert len(page["items"]) == 5 and page["items"][0]["prediction_id"] > page["items"][-1]["prediction_id"]
    rest = client.get(f"/v1/projects/{pid}/predictions",
                      params={"limit": 50, "before_id": page["next_before_id"]}).json()
    ids = [r["prediction_id"] for r in page["items"] + rest["items"]]
    assert len(ids) == 13 == len(set(ids)) and rest["next_before_id"] is None
    # every request thread hands its images to the one inference thread (see Service._inference_pool)
    assert len(scoring_threads) == 1 and scoring_threads.pop().startswith("fewvision-inference")
    stored = client.get(f"/v1/predictions/{one['prediction_id']}").json()
    assert stored["image_sha256"] and stored["score"] == one["score"] and stored["threshold"] == one["threshold"]
    assert stored["created_at"].endswith("+00:00")

    # Review: the queue holds what the model was unsure about, oldest first - and nothing else.
    # measured: 10 of the 12 good images in the band (score / threshold 0.83 - 0.96), 2 accepted below it
    in_band = [r["prediction_id"] for r in rows if r["decision"] == "review"]
    assert 1 <= len(in_band) < len(rows), [r["score"] / r["threshold"] for r in rows]
    queue = [q["prediction_id"] for q in client.get(f"/v1/projects/{pid}/review").json()]
    assert queue == sorted(in_band)
    outside = [one["prediction_id"]] + [r["prediction_id"] for r in rows if r["decision"] != "review"]
    assert not set(outside) & set(queue)  # the defect (rejected far above the threshold) and the confident accepts
    target = client.get(f"/v1/predictions/{queue[0]}").json()
    answer = client.post(f"/v1/predictions/{target['prediction_id']}/review", json={"label": "good"}).json()
    assert answer["prediction"]["reviewed_label"] == "good" and answer["exemplar"]["source"] == "review"
    assert answer["needs_refit"] is True and answer["update_job"]["kind"] == "update"
    update = wait_for(client, answer["update_job"]["job_id"])
    assert update["state"] == "done" and update["model_version"] == 2  # PatchCore took it into its memory
    assert client.get(f"/v1/projects/{pid}").json()["needs_refit"] is True  # a refit would still recalibrate
    assert target["prediction_id"] not in [q["prediction_id"] for q in client.get(f"/v1/projects/{pid}/review").json()]
    assert client.post(f"/v1/predictions/{target['prediction_id']}/review", json={"label": "blue"}).status_code == 422

    versions = client.get(f"/v1/projects/{pid}/models").json()
    assert [(m["version"], m["active"]) for m in versions] == [(1, False), (2, True)]
    assert versions[1]["summary"]["n_images"] == 21
    assert client.post(f"/v1/projects/{pid}/models/1/activate").json()["active_version"] == 1  # roll back
    again = client.post(f"/v1/projects/{pid}/predict", files={"file": (name, defect, "image/jpeg")}).json()
    assert again["model_version"] == 1 and again["score"] == pytest.approx(one["score"], rel=1e-6)
    assert client.post(f"/v1/projects/{pid}/models/9/activate").status_code == 404


def test_an_answer_is_final_and_the_audit_trail_says_who_gave_it(client, anomaly_project):
    pid = anomaly_project["id"]
    (name, data), = textile_bytes("local", 3, 1)
    pred = client.post(f"/v1/projects/{pid}/predict", files={"file": (name, data)}).json()
    first = client.post(f"/v1/predictions/{pred['prediction_id']}/review", json={"label": "good"})
    assert first.status_code == 200 and first.json()["exemplar"]["label"] == "good"
    again = client.post(f"/v1/predictions/{pred['prediction_id']}/review", json={"label": "good"})  # a retry
    assert again.status_code == 200 and again.json()["exemplar"] is None and again.json()["update_job"] is None
    other = client.post(f"/v1/predictions/{pred['prediction_id']}/review", json={"label": "defect"})
    assert other.status_code == 409 and "was reviewed as 'good'" in other.json()["error"]["message"]
    # one exemplar of the image, under one label (it used to get a second one, labelled defect)
    mine = [e for e in client.get(f"/v1/projects/{pid}/exemplars").json() if e["sha256"] == pred["image_sha256"]]
    assert [(e["label"], e["source"]) for e in mine] == [("good", "review")]
    trail = client.get(f"/v1/predictions/{pred['prediction_id']}/reviews").json()
    assert [(t["label"], t["token_name"]) for t in trail] == [("good", "tests")] and trail[0]["created_at"]
    update = wait_for(client, first.json()["update_job"]["job_id"])
    assert update["state"] == "done" and update["model_version"] == 2, update
    origin = {m["version"]: m["origin"] for m in client.get(f"/v1/projects/{pid}/models").json()}[2]
    assert origin == "update: +1 image(s), 1 reviewed, 0 uploaded (good)", origin  # it said "reviewed" of uploads


def test_classification_fit_predict_and_a_correction_updates_the_prototypes(client):
    classes = [{"name": "nominal", "description": "even fabric"}, {"name": "local", "description": "a small spot"},
               {"name": "global", "description": "a changed texture"}]
    p = client.post("/v1/projects", json={"name": "weave", "task": "classification", "backbone": "texture",
                                          "method": "prototype", "classes": classes}).json()
    assert client.post(f"/v1/projects/{p['id']}/fit").json()["error"]["code"] == "not_enough_images"
    for cls in ("nominal", "local", "global"):
        for name, data in textile_bytes(cls, 0, 4):
            assert upload(client, p["id"], name, data, cls).status_code == 201
    assert upload(client, p["id"], "x.jpg", textile_bytes("local", 0, 1)[0][1], "scratch").status_code == 422
    assert wait_for(client, client.post(f"/v1/projects/{p['id']}/fit").json()["job_id"])["state"] == "done"
    (name, data), = textile_bytes("global", 50, 1)
    r = client.post(f"/v1/projects/{p['id']}/predict", files={"file": (name, data, "image/jpeg")}).json()
    assert set(r["probabilities"]) == {"nominal", "local", "global"}
    assert abs(sum(r["probabilities"].values()) - 1) < 1e-5 and r["label"] in r["probabilities"]
    assert r["decision"] == ("accept" if r["label"] == "nominal" else "reject")  # 'nominal' is the good class
    answer = client.post(f"/v1/predictions/{r['prediction_id']}/review", json={"label": "global"}).json()
    assert answer["exemplar"]["label"] == "global"
    assert wait_for(client, answer["update_job"]["job_id"])["model_version"] == 2
    model = client.app.state.service.load_model(p["id"], 2)
    counts = dict(zip(model.class_names, model.head.class_counts_.tolist()))
    assert counts == {"global": 5.0, "local": 4.0, "nominal": 4.0}  # the correction joined its class mean


def test_a_padim_project_takes_a_reviewed_good_image_into_its_gaussians(client):
    p = client.post("/v1/projects", json={"name": "padim line", "task": "anomaly", "backbone": "texture",
                                          "method": "padim"}).json()
    for name, data in textile_bytes("nominal", 0, 8):
        assert upload(client, p["id"], name, data).status_code == 201
    assert wait_for(client, client.post(f"/v1/projects/{p['id']}/fit").json()["job_id"])["model_version"] == 1
    (name, data), = textile_bytes("nominal", 300, 1)
    r = client.post(f"/v1/projects/{p['id']}/predict", files={"file": (name, data, "image/jpeg")}).json()
    answer = client.post(f"/v1/predictions/{r['prediction_id']}/review", json={"label": "good"}).json()
    assert wait_for(client, answer["update_job"]["job_id"])["model_version"] == 2
    old, new = (client.app.state.service.load_model(p["id"], v).head for v in (1, 2))
    assert (old.n_train_images_, new.n_train_images_) == (8, 9) and not bool((old.mean_ == new.mean_).all())
    # a second update job with nothing new to add makes no new version
    assert client.app.state.service._update(client.app.state.service._queue_job(p["id"], "update")["job_id"]) == 2


def test_a_large_image_is_scored_with_bounded_memory_and_a_capped_heat_map(client, anomaly_project):
    """A 19 MP grayscale PNG (under the test client's 20 MP limit): its heat map is drawn at most heatmap_max_side
    pixels a side, in float32, and nothing builds float64 arrays of the full image (measured peak of traced
    allocations during the request: 2,908 MB before, 91 MB after)."""
    import tracemalloc

    big = io.BytesIO()
    Image.new("L", (4400, 4400), 128).save(big, format="PNG")
    tracemalloc.start()
    try:
        r = client.post(f"/v1/projects/{anomaly_project['id']}/predict", files={"file": ("big.png", big.getvalue())})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    heat = Image.open(io.BytesIO(client.get(r.json()["heatmap_url"]).content))
    assert heat.size == (1024, 1024)
    assert peak < 300 * 2**20, f"{peak / 2**20:.0f} MB"


def _raw_upload(app, headers: dict, chunks: int, chunk: bytes = bytes(1 << 20)) -> tuple[int, int, dict]:
    """An upload straight into the ASGI app, its body offered in ``chunks`` chunks: (status, chunks the app read,
    response headers). A client of a real server would still be sending what was not read."""
    import anyio

    read, sent = 0, {}
    started = False

    async def receive():
        nonlocal read
        if started:  # the answer is out: the client hangs up
            return {"type": "http.disconnect"}
        read += 1
        head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' if read == 1 else b""
        return {"type": "http.request", "body": head + chunk, "more_body": read < chunks}

    async def send(message):
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
            sent["status"] = message["status"]
            sent["headers"] = {k.decode().lower(): v.decode() for k, v in message["headers"]}

    scope = {"type": "http", "method": "POST", "path": "/v1/projects/1/exemplars", "raw_path": b"/v1/projects/1/exemplars",
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("testserver", 80), "client": ("c", 1),
             "http_version": "1.1", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    anyio.run(app, scope, receive, send)
    return sent["status"], read, sent["headers"]


def test_an_upload_is_refused_before_its_body_is_read_without_a_token_or_over_the_cap(client):
    app = client.app
    cap = app.state.service.settings.max_request_bytes
    form = {"Content-Type": "multipart/form-data; boundary=x"}
    # no token: 401 before a single byte of the body is read (it used to read it all first); 2000 MB announced:
    # 413 at once, token or not
    assert _raw_upload(app, {**form, "Content-Length": str(50 << 20)}, chunks=50)[:2] == (401, 0)
    assert _raw_upload(app, {**form, "Authorization": "Bearer fv_wrong"}, chunks=2000)[:2] == (401, 0)
    assert _raw_upload(app, {**form, "Content-Length": str(2000 << 20)}, chunks=2000)[:2] == (413, 0)
    token = client.headers["Authorization"]
    # a valid token, a length over the cap: 413 before reading; no length (chunked): 413 once the cap is passed
    assert _raw_upload(app, {**form, "Authorization": token, "Content-Length": str(cap + 1)}, chunks=2000)[:2] == \
        (413, 0)
    status, read, headers = _raw_upload(app, {**form, "Authorization": token}, chunks=2000)
    assert status == 413 and read <= cap // (1 << 20) + 1  # 1 MB chunks: no more than the cap was read
    assert headers["x-content-type-options"] == "nosniff" and "frame-ancestors 'none'" in \
        headers["content-security-policy"]


def test_every_response_carries_the_browser_headers_and_nothing_loads_from_a_cdn(client):
    for path in ("/", "/static/index.html", "/v1/projects", "/v1/health"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff", path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
    assert client.get("/v1/projects").headers["cache-control"] == "no-store"
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404  # Swagger UI's CDN


def test_hostile_uploads_get_a_clear_4xx(client, tmp_path):
    p = client.post("/v1/projects", json={"name": "guard", "task": "anomaly", "backbone": "texture"}).json()
    (name, real), = textile_bytes("nominal", 0, 1)

    def err(r, status):
        assert r.status_code == status, r.text
        return r.json()["error"]["message"]

    assert "not an image" in err(upload(client, p["id"], "report.png", b"<html><script>x</script></html>"), 415)
    assert "over the upload limit" in err(upload(client, p["id"], "big.jpg", real + bytes(2_100_000)), 413)
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")  # 64 MP of zeros in a small file
    assert "pixels is over the limit" in err(upload(client, p["id"], "bomb.png", bomb.getvalue()), 413)
    bomb = io.BytesIO()
    Image.new("1", (15000, 15000)).save(bomb, format="PNG")  # 225 MP: Pillow itself refuses to open it
    assert "too many pixels" in err(upload(client, p["id"], "bigger-bomb.png", bomb.getvalue()), 413)  # was 415
    assert "empty file" in err(upload(client, p["id"], "empty.jpg", b""), 400)
    ok = upload(client, p["id"], "../../../etc/passwd.jpg", real)
    assert ok.status_code == 201 and ok.json()["filename"] == "passwd.jpg"
    data_dir = client.app.state.service.settings.data_dir
    assert not (data_dir.parent / "etc").exists() and (data_dir / "images" / ok.json()["sha256"][:2]).is_dir()
    again = upload(client, p["id"], "same bytes.jpg", real)  # content-addressed: stored once
    assert again.json()["id"] == ok.json()["id"]
    assert "no fitted model" in err(client.post(f"/v1/projects/{p['id']}/predict",
                                                files={"file": (name, real, "image/jpeg")}), 409)


def test_a_start_removes_the_temp_files_of_writers_killed_mid_write(client):
    import os
    import subprocess
    import sys

    from fewvision.service.core import Service

    settings = client.app.state.service.settings
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    left = settings.data_dir / "heatmaps" / "7" / f".{'ab' * 32}-v1.png.{pid}.x1y2z3.tmp"  # a heat map's, never rewritten
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a png")
    os.utime(left, (time.time() - 7200, time.time() - 7200))
    recent = left.with_name(f".{'cd' * 32}-v1.png.{pid}.a1b2c3.tmp")
    recent.write_bytes(b"half a png, a minute ago")
    writing = left.with_name(f".{'ef' * 32}-v1.png.{os.getppid()}.q1w2e3.tmp")  # a live writer's
    writing.write_bytes(b"being written")
    again = Service(settings)
    again.start()
    again.stop()
    assert not left.exists() and writing.exists()
    # SQLite has one owner on this machine: a dead pid is enough. On PostgreSQL the folder may be shared with
    # replicas on other machines, whose pids mean nothing here: only a temp file an hour old goes.
    assert recent.exists() == (client.store == "postgresql")


def test_the_schema_is_migrated_once_and_restarts_cleanly(client):
    from sqlalchemy import inspect, text

    engine = client.app.state.service.engine
    with engine.connect() as conn:
        assert conn.execute(text("select version_num from alembic_version")).scalar() == "0005"
    tables = set(inspect(engine).get_table_names())
    assert {"projects", "exemplars", "jobs", "models", "predictions", "reviews", "tokens", "outbox",
            "sink_cursors", "alarms"} <= tables
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from fewvision.service.store import Base

    with engine.connect() as conn:  # the migrations build exactly the tables the code declares
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diff if not (isinstance(d, tuple) and d[0] == "remove_table" and d[1].name == "alembic_version")] == []
    from fewvision.service.store import migrate

    migrate(client.app.state.service.settings.db_url)  # a second start: nothing to do, no error
    with engine.begin() as conn:  # a store written by a newer fewvision is refused, not migrated or written to
        conn.execute(text("update alembic_version set version_num = '0099'"))
    with pytest.raises(RuntimeError, match="revision 0099, which this fewvision does not know"):
        migrate(client.app.state.service.settings.db_url)


def test_serve_refuses_a_store_it_cannot_migrate_in_one_line(tmp_path):
    import sqlite3
    import subprocess
    import sys

    from fewvision.service.store import migrate

    data = tmp_path / "data"
    data.mkdir()
    db = data / "fewvision.sqlite"  # the default store of --data-dir
    migrate(f"sqlite:///{db}")
    with sqlite3.connect(db) as conn:
        conn.execute("update alembic_version set version_num = '0099'")
    r = subprocess.run([sys.executable, "-m", "fewvision.cli", "serve", "--data-dir", str(data), "--port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "revision 0099" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_two_replicas_saving_versions_of_one_project_at_once_number_them_apart(tmp_path, monkeypatch, textile_root):
    """Two services on one PostgreSQL database (replicas) each save a model of the same project at the same moment;
    the model file takes a while to write (a real one: seconds). They used to both take version 1 and one failed on
    the unique constraint."""
    import fewvision.modelfile
    from fewvision.service.core import Service

    db = fresh_postgres_database(postgres_server_url())
    first, second = (Service(Settings(tmp_path / "shared", db, worker=False)) for _ in range(2))
    project = first.create_project("shared", "anomaly", "texture")
    real_save = fewvision.modelfile.save_model
    both_saving = threading.Barrier(2)

    def slow_save(path, model):
        both_saving.wait(timeout=30)  # each has decided what it can before writing its file
        time.sleep(0.3)
        return real_save(path, model)

    monkeypatch.setattr(fewvision.modelfile, "save_model", slow_save)
    from fewvision.tasks.anomaly import fit_anomaly

    nominal = sorted((textile_root / "nominal").glob("*.jpg"))[:4]
    model = fit_anomaly(nominal, "patchcore", "texture", target_false_reject=0.25, use_cache=False)
    versions, errors = [], []

    def save(service):
        try:
            versions.append(service._save_version(project["id"], model, origin="test"))
        except Exception as err:  # noqa: BLE001 - what the test looks for
            errors.append(err)

    threads = [threading.Thread(target=save, args=(s,)) for s in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s in (first, second):
        s.stop()
    assert errors == [] and sorted(versions) == [1, 2]
    files = sorted(p.name for p in (tmp_path / "shared" / "models" / str(project["id"])).iterdir())
    assert files == ["v1.fvm", "v2.fvm"]



def test_the_monitor_endpoint_counts_watches_and_takes_acknowledgements(client, anomaly_project, monkeypatch, capsys):
    """Good images, then blurred ones (sigma 2): /monitor counts the decisions per hour, replays the drift monitor
    over the active version's predictions (a martingale alarm on a blurred image, recorded once), and an alarm is
    acknowledged with the token that did it; a new service on the same store computes the same."""
    import io

    from PIL import Image, ImageFilter

    pid = anomaly_project["id"]
    good = textile_bytes("nominal", 20, 20)
    blurred = []
    for name, data in textile_bytes("nominal", 40, 30):
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).filter(ImageFilter.GaussianBlur(2)).save(buf, format="JPEG", quality=95)
        blurred.append((f"blur-{name}", buf.getvalue()))
    for batch in (good, blurred):
        r = client.post(f"/v1/projects/{pid}/predict-batch", files=[("files", (n, d, "image/jpeg")) for n, d in batch])
        assert r.status_code == 200, r.text
    from sqlalchemy import select

    from fewvision.service.store import Alarm

    with client.app.state.service.Session() as s:  # raised as the predictions came, before anyone looked
        assert "martingale" in s.scalars(select(Alarm.kind).where(Alarm.project_id == pid)).all()
    m = client.get(f"/v1/projects/{pid}/monitor", params={"since": "1h"})
    assert m.status_code == 200, m.text
    m = m.json()
    assert sum(m["counts"].values()) == 50 and sum(sum(v for k, v in h.items() if k not in ("hour", "yield"))
                                                   for h in m["per_hour"]) == 50
    assert m["yield"] == m["counts"].get("accept", 0) / 50
    series = m["monitor"]["series"]
    assert len(series["martingale"]) == 50 and series["prediction_id"] == sorted(series["prediction_id"])
    names = {p["prediction_id"]: p["filename"] for p in
             client.get(f"/v1/projects/{pid}/predictions", params={"limit": 100}).json()["items"]}
    drift = [a for a in m["alarms"] if a["kind"] == "martingale"]
    assert drift and all(names[a["prediction_id"]].startswith("blur-") for a in drift), m["alarms"]
    assert client.get(f"/v1/projects/{pid}/monitor", params={"since": "yesterday"}).status_code == 422
    ack = client.post(f"/v1/alarms/{drift[0]['id']}/acknowledge")
    assert ack.status_code == 200 and ack.json()["acknowledged_by"] is not None and ack.json()["acknowledged_at"]
    again = client.get(f"/v1/projects/{pid}/monitor").json()
    assert [a["id"] for a in again["alarms"]] == [a["id"] for a in m["alarms"]]  # recorded once
    from fewvision.service.core import Service

    other = Service(client.app.state.service.settings)
    try:
        replayed = other.monitor(pid)
    finally:
        other.stop()
    assert replayed["monitor"]["series"]["martingale"] == series["martingale"]
    assert [a["id"] for a in replayed["alarms"]] == [a["id"] for a in m["alarms"]]
    # the shift report: the flagged images (reject, review) as a gallery, the alarms, from the API and the command
    flagged = sum(m["counts"].get(d, 0) for d in ("reject", "review"))
    html = client.get(f"/v1/projects/{pid}/report", params={"since": "all"})
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert html.text.count('<img src="data:image/jpeg;base64,') == flagged >= 25
    assert f"<h2>Flagged images ({flagged})</h2>" in html.text and "the scores stopped looking like" in html.text
    settings = client.app.state.service.settings
    from cli_helpers import run_cli

    out = settings.data_dir.parent / "shift.html"
    args = ["report", "--data-dir", settings.data_dir, "--project", "line 3 fabric", "--since", "all", "-o", out]
    code, _, err = run_cli(monkeypatch, capsys, *args, *(["--db", settings.db_url] if client.store == "postgresql"
                                                         else []))
    assert code == 0 and f"{flagged} flagged" in err, err
    assert out.read_text().count('<img src="data:image/jpeg;base64,') == flagged
    # a person resets the monitor after the fix: it starts again from the calibration scores alone, and a replay
    # restarts at the same prediction
    reset = client.post(f"/v1/projects/{pid}/monitor/reset")
    assert reset.status_code == 200 and reset.json()["kind"] == "reset", reset.text
    assert reset.json()["prediction_id"] == max(series["prediction_id"]) and reset.json()["acknowledged_by"]
    assert client.post(f"/v1/projects/{pid}/monitor/reset").json()["error"]["code"] == "conflict"
    r = client.post(f"/v1/projects/{pid}/predict-batch",
                    files=[("files", (n, d, "image/jpeg")) for n, d in textile_bytes("nominal", 80, 5)])
    assert r.status_code == 200
    after = client.get(f"/v1/projects/{pid}/monitor").json()
    n_cal = after["monitor"]["calibration"]["n"]
    assert client.app.state.service._watchers[(pid, 1)]["monitor"].pvalues.seen == n_cal + 5
    other = Service(client.app.state.service.settings)
    try:
        assert other.monitor(pid)["monitor"]["series"]["martingale"] == after["monitor"]["series"]["martingale"]
        assert other._watchers[(pid, 1)]["monitor"].pvalues.seen == n_cal + 5
    finally:
        other.stop()
