"""SLAC and TLAC on the tiny random CLIP with a scripted LMM served on 127.0.0.1.

The tiny CLIP's text tower is random, so a free-text answer says nothing about a class; the scripts therefore answer
with the exact prompt of a class ("a photo of local.", the only template used here), whose embedding *is* that class's
zero-shot weight. The answers are chosen to disagree with CLIP zero-shot, so the tests pass only when the LMM answer,
not the image features, decides.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import warnings

import numpy as np
import pytest
from lmm_server import ScriptedLMMServer, by_image, raw, reply, slow, status

from fewvision.heads import create_head
from fewvision.heads.support import Support
from fewvision.heads.tlac import CHOICE_PROMPT, parse_choice
from fewvision.io.images import sha256_file
from fewvision.lmm import ChatCompletionsClient
from fewvision.tasks.zeroshot import classify, classify_with_lmm

CLASSES = ["nominal", "local", "global"]
TEMPLATE = ["a photo of {}."]
STAGE2 = "none of them fits"  # a phrase of the TLAC choice prompt: marks stage-2 requests
assert STAGE2 in CHOICE_PROMPT


def prompt_of(name: str) -> str:
    return TEMPLATE[0].format(name)


@pytest.fixture(scope="module")
def paths(textile_subset) -> list[str]:
    return [str(p) for c in CLASSES for p in sorted((textile_subset / c).glob("*.jpg"))[:4]]


@pytest.fixture(scope="module")
def zeroshot(tiny_clip, paths):
    preds = classify(paths, CLASSES, backbone=tiny_clip, templates=TEMPLATE)
    return {r["path"]: r for r in preds.rows}


def lmm_for(server, tmp_path, **kw):
    params = dict(timeout=2.0, retries=1, backoff=0.01, concurrency=4, cache_dir=str(tmp_path / "cache"))
    params.update(kw)
    return ChatCompletionsClient(server.url, "scripted", **params)


def other(label: str, shift: int = 1) -> str:
    return CLASSES[(CLASSES.index(label) + shift) % len(CLASSES)]


def test_slac_answer_decides_and_second_run_sends_nothing(tiny_clip, paths, zeroshot, tmp_path):
    target = {p: other(zeroshot[p]["label"]) for p in paths}
    script = by_image({sha256_file(p): reply(prompt_of(target[p])) for p in paths})
    with ScriptedLMMServer(script) as server:
        first = classify_with_lmm(paths, CLASSES, backbone=tiny_clip, lmm=lmm_for(server, tmp_path), method="slac",
                                  templates=TEMPLATE)
        assert server.count == len(paths)
        second = classify_with_lmm(paths, CLASSES, backbone=tiny_clip, lmm=lmm_for(server, tmp_path),
                                   method="slac", templates=TEMPLATE)
        assert server.count == len(paths)  # every answer came from the answer cache
    assert {r["path"]: r["label"] for r in first.rows} == target
    assert all(r["label"] != zeroshot[r["path"]]["label"] for r in first.rows)
    assert all(r["decision"] == "slac" and r["note"] == f"LMM: {prompt_of(target[r['path']])}" for r in first.rows)
    assert [r["probabilities"] for r in second.rows] == [r["probabilities"] for r in first.rows]
    # probabilities = softmax(logit_scale * cosine(answer embedding, class weights))
    head = create_head("slac", classes=CLASSES, templates=TEMPLATE).fit(Support.text_only(CLASSES, tiny_clip))
    emb = tiny_clip.encode_text([prompt_of(target[paths[0]])])[0].numpy()
    logits = tiny_clip.logit_scale * emb @ head.weights_.numpy()
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert np.allclose([first.rows[0]["probabilities"][c] for c in CLASSES], expected, atol=1e-5)


def test_slac_falls_back_per_image_and_retries_only_failures(tiny_clip, paths, zeroshot, tmp_path):
    shas = [sha256_file(p) for p in paths]
    script = {s: reply(prompt_of(other(zeroshot[p]["label"]))) for s, p in zip(shas, paths)}
    script[shas[0]] = status(500, "out of memory")  # retried, then given up
    script[shas[1]] = slow(1.0)  # beyond the client timeout
    script[shas[2]] = raw(b'{"choices": [')  # malformed JSON
    script[shas[3]] = reply("I'm sorry, I can't help with that.")  # refusal
    script[shas[4]] = reply("")  # empty content
    script[shas[5]] = [status(502), reply(prompt_of(other(zeroshot[paths[5]]["label"])))]  # retried, then fine
    with ScriptedLMMServer(by_image(script), max_delay=1.0) as server:
        run = lambda: classify_with_lmm(paths, CLASSES, backbone=tiny_clip, method="slac", templates=TEMPLATE,  # noqa: E731
                                        lmm=lmm_for(server, tmp_path, timeout=0.3))
        preds = run()
        assert server.count_for(shas[0]) == 2 and server.count_for(shas[1]) == 2 and server.count_for(shas[5]) == 2
        assert server.count_for(shas[2]) == 1 and server.count_for(shas[3]) == 1
        before = server.count
        again = run()
        # Only the answers that never came back are asked again; the refusal and the good answers are cached.
        assert server.count - before == 2 + 2 + 1 + 1
    rows = {r["path"]: r for r in preds.rows}
    reasons = ["HTTP 500", "timed out", "malformed JSON", "refusal", "empty answer"]
    for p, reason in zip(paths[:5], reasons):
        r = rows[p]
        assert r["decision"] == "fallback-zeroshot" and r["note"].startswith("fallback: ") and reason in r["note"]
        assert r["label"] == zeroshot[p]["label"]
        assert np.allclose(list(r["probabilities"].values()), list(zeroshot[p]["probabilities"].values()), atol=1e-6)
    for p in paths[5:]:
        assert rows[p]["decision"] == "slac" and rows[p]["label"] == other(zeroshot[p]["label"])
    assert [r["label"] for r in again.rows] == [r["label"] for r in preds.rows]


def test_tlac_choice_overrides_clip_and_slac(tiny_clip, paths, zeroshot, tmp_path):
    shas = [sha256_file(p) for p in paths]
    stage1 = {s: reply(prompt_of(zeroshot[p]["label"])) for s, p in zip(shas, paths)}  # agrees with CLIP
    choice = {p: other(zeroshot[p]["label"], 2) for p in paths}
    stage2 = {s: reply(choice[p].upper() + ".") for s, p in zip(shas, paths)}  # case and punctuation ignored
    with ScriptedLMMServer(by_image(stage1, marker=STAGE2, marked=stage2)) as server:
        preds = classify_with_lmm(paths, CLASSES, backbone=tiny_clip, lmm=lmm_for(server, tmp_path), method="tlac",
                                  templates=TEMPLATE)
    assert server.count == 2 * len(paths)
    for r in preds.rows:
        assert r["label"] == choice[r["path"]] != zeroshot[r["path"]]["label"]
        assert r["decision"] == "tlac-choice" and f"LMM chose {choice[r['path']]}" in r["note"]
        assert r["probabilities"][r["label"]] >= 0.5 and abs(sum(r["probabilities"].values()) - 1) < 1e-9
    # Stage 2 listed every class (top-3 of 3) with CLIP+SLAC's favourite first.
    asked = [q for q in server.requests if STAGE2 in q.prompt]
    assert all(all(f". {c}" in q.prompt for c in CLASSES) for q in asked)
    first_option = {q.sha256: q.prompt.split("1. ", 1)[1].split("\n", 1)[0] for q in asked}
    assert all(first_option[s] == zeroshot[p]["label"] for s, p in zip(shas, paths))


def test_tlac_candidates_numbers_none_and_garbage(tiny_clip, paths, zeroshot, tmp_path):
    shas = [sha256_file(p) for p in paths]
    # Stage 1 points away from CLIP, so with top_k=1 the candidates are {CLIP's top-1, SLAC's top-1}.
    slac_label = {p: other(zeroshot[p]["label"]) for p in paths}
    stage1 = {s: reply(prompt_of(slac_label[p])) for s, p in zip(shas, paths)}
    kinds = ["number", "none", "garbage", "unusable", "sentence", "stage1-failed"] * 2
    for s, kind in zip(shas, kinds):
        if kind == "stage1-failed":
            stage1[s] = status(500)  # stage 1 unusable: candidates from CLIP alone, the choice still counts
    stage2 = {}
    for s, kind in zip(shas, kinds):
        stage2[s] = {"number": reply("2"), "none": reply("None of them."), "garbage": reply("a blue banana"),
                     "unusable": status(503), "sentence": None, "stage1-failed": reply("1")}[kind]
    for s, p, kind in zip(shas, paths, kinds):
        if kind == "sentence":
            stage2[s] = reply(f"The image most likely shows {slac_label[p]}, judging by the texture.")
    with ScriptedLMMServer(by_image(stage1, marker=STAGE2, marked=stage2)) as server:
        preds = classify_with_lmm(paths, CLASSES, backbone=tiny_clip, lmm=lmm_for(server, tmp_path), method="tlac",
                                  templates=TEMPLATE, top_k=1)
        asked = {q.sha256: q.prompt for q in server.requests if STAGE2 in q.prompt}
    head = create_head("slac", classes=CLASSES, templates=TEMPLATE).fit(Support.text_only(CLASSES, tiny_clip))
    for s, p, kind, r in zip(shas, paths, kinds, preds.rows):
        p_clip = np.array([zeroshot[p]["probabilities"][c] for c in CLASSES])
        options = [line.split(". ", 1)[1] for line in asked[s].splitlines() if line[:1].isdigit()]
        if kind == "stage1-failed":
            assert options == [zeroshot[p]["label"]]
            assert r["label"] == options[0] and r["decision"] == "tlac-choice/stage1-fallback"
            continue
        assert sorted(options) == sorted({zeroshot[p]["label"], slac_label[p]}) and len(options) == 2
        p_slac = head.answer_logits([prompt_of(slac_label[p])]).softmax(-1)[0].double().numpy()
        base = (p_clip + p_slac) / 2
        got = np.array([r["probabilities"][c] for c in CLASSES])
        if kind in ("number", "sentence"):
            expected = options[1] if kind == "number" else slac_label[p]
            assert r["label"] == expected and r["decision"] == "tlac-choice"
            assert np.allclose(got, 0.5 * base + 0.5 * np.eye(3)[CLASSES.index(expected)], atol=1e-5)
        else:
            assert r["decision"] == {"none": "tlac-none", "garbage": "tlac-unparsed", "unusable": "tlac-unusable"}[kind]
            assert r["label"] == CLASSES[int(np.argmax(base))]
            assert np.allclose(got, base, atol=1e-5)
            assert "-> CLIP+SLAC" in r["note"]


@pytest.mark.parametrize("answer, expected", [
    ("local", ("choice", 1)),
    ("  Global.  ", ("choice", 2)),
    ("**nominal**", ("choice", 0)),
    ("2", ("choice", 1)),
    ("Option 3", ("choice", 2)),
    ("3. global", ("choice", 2)),
    ("3. local", ("unparsed", None)),  # the number and the name disagree
    ("The answer is local.", ("choice", 1)),
    ("none", ("none", None)),
    ("None of the above.", ("none", None)),
    ("Neither", ("none", None)),
    ("local or global", ("unparsed", None)),
    ("7", ("unparsed", None)),
    ("a blue banana", ("unparsed", None)),
    ("", ("unparsed", None)),
])
def test_parse_choice(answer, expected):
    assert parse_choice(answer, ["nominal", "local", "global"]) == expected


def test_parse_choice_prefers_the_longer_name():
    names = ["defect", "local defect", "ok_part"]
    assert parse_choice("It shows a local defect.", names) == ("choice", 1)
    assert parse_choice("ok part", names) == ("choice", 2)
    assert parse_choice("a defect", names) == ("choice", 0)


def test_slac_head_is_a_zeroshot_head_for_features(tiny_clip):
    support = Support.text_only(CLASSES, tiny_clip)
    slac = create_head("slac", classes=CLASSES, templates=TEMPLATE).fit(support)
    zs = create_head("zeroshot", classes=CLASSES, templates=TEMPLATE).fit(support)
    feats = np.random.default_rng(0).normal(size=(5, slac.weights_.shape[0])).astype(np.float32)
    assert np.allclose(slac.predict_proba(feats), zs.predict_proba(feats))
    tensors, config = slac.state()
    loaded = type(slac).from_state(tensors, json.loads(json.dumps(config)))
    assert loaded.prompt == slac.prompt and np.allclose(loaded.predict_proba(feats), zs.predict_proba(feats))
    with pytest.raises(ValueError, match="bind"):
        loaded.answer_logits(["x"])
    assert np.allclose(loaded.bind(tiny_clip).answer_logits(["x"]).numpy(), slac.answer_logits(["x"]).numpy())


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``fewvision ARGS`` in this process (the loopback server lives here too); returns (exit code, stderr)."""
    from fewvision.cli import main

    monkeypatch.setattr(sys, "argv", ["fewvision", *map(str, args)])
    level = logging.getLogger().level
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:  # main() quiets libraries globally
        main()
        sys.exit(0)
    logging.getLogger().setLevel(level)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_classify_and_eval_with_loopback_lmm(tmp_path, tiny_clip_config, textile_subset, monkeypatch, capsys):
    truth = {str(p): p.parent.name for p in textile_subset.rglob("*.jpg")}
    script = {sha256_file(p): reply(prompt_of(c)) for p, c in truth.items()}
    stage2 = {sha256_file(p): reply(c) for p, c in truth.items()}
    monkeypatch.setenv("FEWVISION_CACHE_DIR", str(tmp_path / "cache"))
    common = ["--backbone", f"openclip:{tiny_clip_config}", "--template", TEMPLATE[0], "--lmm-model", "scripted",
              "--lmm-timeout", "5", "--lmm-concurrency", "4"]
    with ScriptedLMMServer(by_image(script, marker=STAGE2, marked=stage2)) as server:
        out, report = tmp_path / "res.csv", tmp_path / "report"
        code, err = run_cli(monkeypatch, capsys, "classify", textile_subset, "--classes", ",".join(CLASSES),
                            "--method", "slac", "--lmm-url", server.url, "--out", out, "--report", report, *common)
        assert code == 0, err
        assert server.count == len(truth)
        metrics = tmp_path / "metrics.json"
        code, err = run_cli(monkeypatch, capsys, "eval", textile_subset, "--method", "tlac",
                            "--lmm-url", server.url.removesuffix("/v1"), "--out", metrics, *common)
        assert code == 0, err
        # tlac's stage 1 is slac's question: cached; only the stage-2 questions went out.
        assert server.count == 2 * len(truth)
    assert f"decisions: tlac-choice {len(truth)}" in err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(truth)
    assert all(r["label"] == truth[r["path"]] and r["note"] == f"LMM: {prompt_of(truth[r['path']])}" for r in rows)
    page = next(report.glob("*.html")).read_text()
    assert page.count("LMM: a photo of ") >= len(truth)
    m = json.loads(metrics.read_text())
    assert m["accuracy"] == 1.0 and m["method"] == "tlac" and m["decisions"] == {"tlac-choice": len(truth)}


@pytest.mark.parametrize("args, message", [
    (["--method", "slac"], "--lmm-url"),
    (["--method", "slac", "--lmm-url", "http://127.0.0.1:9"], "--lmm-model"),
    (["--lmm-url", "http://127.0.0.1:9", "--lmm-model", "m"], "only to --method slac or tlac"),
    (["--method", "magic"], "unknown method"),
])
def test_cli_lmm_option_errors(tmp_path, textile_subset, monkeypatch, capsys, args, message):
    monkeypatch.setenv("FEWVISION_CACHE_DIR", str(tmp_path))
    code, err = run_cli(monkeypatch, capsys, "classify", textile_subset / "local", "--classes", "a,b",
                        "--backbone", "texture", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_unreadable_files_are_skipped_before_any_request(tiny_clip, paths, zeroshot, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with ScriptedLMMServer(lambda req: reply(prompt_of("global"))) as server:
        preds = classify_with_lmm([paths[0], str(broken), paths[1]], CLASSES, backbone=tiny_clip, method="slac",
                                  lmm=lmm_for(server, tmp_path), templates=TEMPLATE)
    assert [r["path"] for r in preds.rows] == [paths[0], paths[1]] and all(r["label"] == "global" for r in preds.rows)
    assert [s.path for s in preds.skipped] == [str(broken)] and server.count == 2
