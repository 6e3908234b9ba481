"""SLAC and TLAC on the tiny random CLIP with a scripted LMM served on 127.0.0.1.

The scripted LMM answers the way a real one does: sentences with synonyms, attributes and explanations, markdown,
other casing, plurals, several lines, text-part lists, refusals ("I'm sorry, but ...") and near-refusals ("I can't
see any defect"). For TLAC's choice stage it answers with names inside sentences, option numbers, "none", echoed
option lines, and answers that name two options.

SLAC's mapping is CLIP text-space similarity only (no name or synonym matching, heads/slac.py). With a random text
tower a free-text answer carries no meaning, so the tests compute what the head must give *independently*: the class
weights from ``backbone.encode_text`` of every template filled with the name and synonyms plus the descriptions
(normalised, averaged, normalised; docs/methods/slac-tlac.md), the answer's normalised embedding, and
``softmax(logit_scale * cosine)``. Each image gets a realistic answer whose expected class disagrees with CLIP
zero-shot, so a test passes only when the answer, mapped as documented, decides. TLAC's stage 2 is deterministic
(``parse_choice``), so its tests assert the exact choice, decision path, probabilities and note.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import sys
import warnings

import numpy as np
import pytest
from lmm_server import ScriptedLMMServer, by_image, raw, reply, slow, status

from fewvision.heads import create_head
from fewvision.prompts import ClassSpec
from fewvision.heads.slac import SLAC_PROMPT
from fewvision.heads.support import Support
from fewvision.heads.tlac import CHOICE_PROMPT, parse_choice
from fewvision.io.images import sha256_file
from fewvision.lmm import ChatCompletionsClient
from fewvision.tasks.zeroshot import classify, classify_with_lmm

CLASSES = ["nominal", "local", "global"]
TEMPLATE = ["a photo of {}."]
STAGE2 = "none of them fits"  # a phrase of the TLAC choice prompt: marks stage-2 requests
assert STAGE2 in CHOICE_PROMPT

# A class file as a user would write it for the textile images: synonyms and one description per class.
RICH = [
    ClassSpec("nominal", ["defect-free fabric", "clean textile"], ["a clean, evenly woven fabric with no flaws"]),
    ClassSpec("local", ["local defect", "hole", "stain"], ["a small hole, stain or tear in one spot of the fabric"]),
    ClassSpec("global", ["global defect"], ["the whole fabric is discoloured, faded or distorted"]),
]
RICH_TEMPLATES = ["a photo of {}.", "a close-up photo of fabric with {}."]

# Stage-1 answers as LMMs write them to "Which object is present in the image? Also tell its attribute."
ANSWERS = [
    "The image shows a woven fabric with a small dark stain near the centre.",
    "Object: fabric. Attribute: torn; there is a hole.",
    "I see a scratch - a thin bright line across the metal surface",
    "A piece of grey textile. Its attribute: uniform, clean weave with no visible defects.",
    "**Object:** woven fabric\n**Attribute:** a local defect (a small hole on the left)",
    "Fabric with a GLOBAL discolouration: the whole sheet looks faded.",
    "The object is a textile sample; attribute: nominal, nothing wrong with it.",
    "Local defects: two small knots in the weave.",
    "Object - cloth. Attribute - wrinkled all over.",
    "  It is a close-up of a fabric surface.\n\nThe attribute is a thin tear in one spot.  ",
    "A knitted textile, evenly coloured, with a fine regular pattern.",
    "fabric, stained",
    "The whole piece of cloth is distorted and uneven in colour.",
    "Object: cloth\nAttribute: has a hole",
    "1. **Object**: a textile swatch\n2. **Attribute**: globally faded, with uneven colour across the sheet",
]
# A verbose answer, far beyond CLIP's 77-token context (the head embeds it truncated) and the note's 300 characters.
LONG_ANSWER = (
    "The object present in the image is a piece of woven fabric, photographed from above under even, diffuse "
    "lighting. Its most notable attribute is a small, irregular dark stain located slightly to the left of the "
    "centre of the frame; apart from this spot the weave appears regular, the threads are evenly spaced and the "
    "colour is a uniform light grey. There are no visible holes, tears, knots or loose threads elsewhere, and the "
    "edges of the sample look straight and undamaged. Overall I would describe it as a clean textile with one "
    "localised blemish, which could be oil, dirt or dye residue from the production process."
)


def collapse(text: str) -> str:
    """An answer as a one-line note shows it: whitespace runs (newlines included) become one space."""
    return " ".join(text.split())


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def expected_slac(backbone, classes, templates, answers) -> np.ndarray:
    """[N, C] SLAC probabilities computed here, from the backbone's text tower and the documented formula only:
    class weight = unit(mean(unit(embedding of each template filled with the name and each synonym, and of each
    description))); p = softmax(logit_scale * <unit(answer embedding), class weight>). The client strips the answer."""
    specs = [c if isinstance(c, ClassSpec) else ClassSpec(c) for c in classes]
    weights = []
    for s in specs:
        prompts = [t.format(p) for p in [s.name, *s.synonyms] for t in templates] + list(s.descriptions)
        weights.append(_unit(_unit(backbone.encode_text(prompts).numpy().astype(np.float64)).mean(axis=0)))
    emb = _unit(backbone.encode_text([a.strip() for a in answers]).numpy().astype(np.float64))
    logits = float(backbone.logit_scale) * emb @ np.stack(weights, axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def pick(pool: dict[str, np.ndarray], accept, start: int) -> str:
    """The first answer of the pool, from position ``start`` on (cyclically), whose expected class ``accept``s."""
    answers = list(pool)
    for k in range(len(answers)):
        a = answers[(start + k) % len(answers)]
        if accept(CLASSES[int(np.argmax(pool[a]))]):
            return a
    raise AssertionError("no answer in ANSWERS maps to a suitable class with this backbone: add more answers")


def probs(row) -> np.ndarray:
    return np.array([row["probabilities"][c] for c in CLASSES])


def options_in(prompt: str) -> list[str]:
    """Candidate names, in order, from a stage-2 question ("1. name" or "1. name: description" lines)."""
    return [line.split(". ", 1)[1].split(":", 1)[0] for line in prompt.splitlines() if line[:1].isdigit()]


@pytest.fixture(scope="module")
def paths(textile_subset) -> list[str]:
    return [str(p) for c in CLASSES for p in sorted((textile_subset / c).glob("*.jpg"))[:4]]


@pytest.fixture(scope="module")
def zeroshot(tiny_clip, paths):
    preds = classify(paths, CLASSES, backbone=tiny_clip, templates=TEMPLATE)
    return {r["path"]: r for r in preds.rows}


@pytest.fixture(scope="module")
def zeroshot_rich(tiny_clip, paths):
    preds = classify(paths, RICH, backbone=tiny_clip, templates=RICH_TEMPLATES)
    return {r["path"]: r for r in preds.rows}


@pytest.fixture(scope="module")
def pool(tiny_clip) -> dict[str, np.ndarray]:
    """Each realistic answer -> its expected SLAC probabilities for CLASSES with TEMPLATE (computed here)."""
    return dict(zip(ANSWERS, expected_slac(tiny_clip, CLASSES, TEMPLATE, ANSWERS)))


@pytest.fixture(scope="module")
def pool_rich(tiny_clip) -> dict[str, np.ndarray]:
    return dict(zip(ANSWERS, expected_slac(tiny_clip, RICH, RICH_TEMPLATES, ANSWERS)))


def lmm_for(server, tmp_path, **kw):
    params = dict(timeout=2.0, retries=1, backoff=0.01, concurrency=4, cache_dir=str(tmp_path / "cache"))
    params.update(kw)
    return ChatCompletionsClient(server.url, "scripted", **params)


def test_realistic_answers_cover_every_class(pool, pool_rich):
    # The tests below need, for every CLIP label, a realistic answer that maps elsewhere (and one that agrees).
    for table in (pool, pool_rich):
        assert {CLASSES[int(np.argmax(p))] for p in table.values()} == set(CLASSES)


# --- SLAC --------------------------------------------------------------------------------------------------------
def test_slac_answer_decides_and_second_run_sends_nothing(tiny_clip, paths, zeroshot, pool, tmp_path):
    answer = {p: pick(pool, lambda c, p=p: c != zeroshot[p]["label"], i) for i, p in enumerate(paths)}
    assert len(set(answer.values())) >= 4  # several phrasings, not one answer everywhere
    script = by_image({sha256_file(p): reply(answer[p]) for p in paths})
    with ScriptedLMMServer(script) as server:
        first = classify_with_lmm(paths, CLASSES, backbone=tiny_clip, lmm=lmm_for(server, tmp_path), method="slac",
                                  templates=TEMPLATE)
        assert server.count == len(paths)
        assert all(q.prompt == SLAC_PROMPT for q in server.requests)  # the paper's question, verbatim
        second = classify_with_lmm(paths, CLASSES, backbone=tiny_clip, lmm=lmm_for(server, tmp_path),
                                   method="slac", templates=TEMPLATE)
        assert server.count == len(paths)  # every answer came from the answer cache
    for r in first.rows:
        expected = pool[answer[r["path"]]]
        # p = softmax(logit_scale * cosine(answer embedding, class weights)), label = argmax
        assert np.allclose(probs(r), expected, atol=1e-5)
        assert r["label"] == CLASSES[int(np.argmax(expected))] != zeroshot[r["path"]]["label"]
        assert r["decision"] == "slac" and r["note"] == f"LMM: {collapse(answer[r['path']])}"
    assert [r["probabilities"] for r in second.rows] == [r["probabilities"] for r in first.rows]
    assert [r["note"] for r in second.rows] == [r["note"] for r in first.rows]


def test_slac_maps_realistic_answers_with_the_class_file_weights(tiny_clip, paths, zeroshot_rich, pool_rich,
                                                                   tmp_path):
    """Synonyms and descriptions enter the class weights; long, multi-line and text-part answers are embedded whole
    (truncated by the text tower), and the note is one line."""
    shas = [sha256_file(p) for p in paths]
    answer = {p: pick(pool_rich, lambda c, p=p: c != zeroshot_rich[p]["label"], 2 * i) for i, p in enumerate(paths)}
    answer[paths[0]] = LONG_ANSWER
    parts = ["Object: woven fabric. ", "Attribute: a small hole near the edge."]
    answer[paths[1]] = "".join(parts)  # sent as a list of text parts, as some servers do
    script = {s: reply(answer[p]) for s, p in zip(shas, paths)}
    script[shas[1]] = raw(json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": [
        {"type": "text", "text": t} for t in parts]}}]}).encode())
    with ScriptedLMMServer(by_image(script)) as server:
        preds = classify_with_lmm(paths, RICH, backbone=tiny_clip, lmm=lmm_for(server, tmp_path), method="slac",
                                  templates=RICH_TEMPLATES)
    expected = expected_slac(tiny_clip, RICH, RICH_TEMPLATES, [answer[p] for p in paths])
    # The same answers against name-only weights give other probabilities: the class file matters.
    assert not np.allclose(expected, expected_slac(tiny_clip, CLASSES, RICH_TEMPLATES, [answer[p] for p in paths]),
                           atol=1e-3)
    for r, p, e in zip(preds.rows, paths, expected):
        assert r["path"] == p and r["decision"] == "slac"
        assert np.allclose(probs(r), e, atol=1e-5), answer[p]
        assert r["label"] == CLASSES[int(np.argmax(e))]
        if p not in (paths[0], paths[1]):
            assert r["label"] != zeroshot_rich[p]["label"]
        assert "\n" not in r["note"]
    rows = {r["path"]: r for r in preds.rows}
    assert rows[paths[1]]["note"] == "LMM: Object: woven fabric. Attribute: a small hole near the edge."
    long_note = rows[paths[0]]["note"]
    assert long_note.startswith("LMM: " + collapse(LONG_ANSWER)[:250]) and len(long_note) <= len("LMM: ") + 300
    assert rows[paths[9]]["note"] == f"LMM: {collapse(answer[paths[9]])}"


def test_slac_falls_back_per_image_and_retries_only_failures(tiny_clip, paths, zeroshot, pool, tmp_path):
    shas = [sha256_file(p) for p in paths]
    answer = {p: pick(pool, lambda c, p=p: c != zeroshot[p]["label"], i) for i, p in enumerate(paths)}
    # Descriptions that only say something is absent, or that hedge after the first sentence, are not refusals.
    answer[paths[8]] = "I can't see any defect; the fabric looks uniform."
    answer[paths[9]] = "Object: woven fabric. Attribute: a small hole. I can't determine how it was caused, though."
    script = {s: reply(answer[p]) for s, p in zip(shas, paths)}
    script[shas[0]] = status(500, "out of memory")  # retried, then given up
    script[shas[1]] = slow(1.0)  # beyond the client timeout
    script[shas[2]] = raw(b'{"choices": [')  # malformed JSON
    script[shas[3]] = reply("I\u2019m sorry, but I can\u2019t help with identifying objects in this image.")  # refusal
    script[shas[4]] = reply("  \n ")  # whitespace only: empty
    script[shas[5]] = [status(502), reply(answer[paths[5]])]  # retried, then fine
    script[shas[6]] = reply("As an AI language model, I cannot view images. Please describe the picture instead.")
    script[shas[7]] = reply("Unfortunately, I am unable to analyze this image.\nPlease try another photo.")
    with ScriptedLMMServer(by_image(script), max_delay=1.0) as server:
        run = lambda: classify_with_lmm(paths, CLASSES, backbone=tiny_clip, method="slac", templates=TEMPLATE,  # noqa: E731
                                        lmm=lmm_for(server, tmp_path, timeout=0.3))
        preds = run()
        assert server.count_for(shas[0]) == 2 and server.count_for(shas[1]) == 2 and server.count_for(shas[5]) == 2
        assert server.count_for(shas[2]) == 1 and server.count_for(shas[3]) == 1
        before = server.count
        again = run()
        # Only the answers that never came back are asked again; the refusals and the good answers are cached.
        assert server.count - before == 2 + 2 + 1 + 1
    rows = {r["path"]: r for r in preds.rows}
    fallbacks = {0: "HTTP 500", 1: "timed out", 2: "malformed JSON", 3: "refusal", 4: "empty answer", 6: "refusal",
                 7: "refusal"}
    for i, reason in fallbacks.items():
        r = rows[paths[i]]
        assert r["decision"] == "fallback-zeroshot" and r["note"].startswith("fallback: ") and reason in r["note"]
        assert r["note"].endswith("(CLIP zero-shot)")
        assert r["label"] == zeroshot[paths[i]]["label"]
        assert np.allclose(probs(r), probs(zeroshot[paths[i]]), atol=1e-6)
    for i in (5, 8, 9, 10, 11):
        r, expected = rows[paths[i]], expected_slac(tiny_clip, CLASSES, TEMPLATE, [answer[paths[i]]])[0]
        assert r["decision"] == "slac" and r["note"] == f"LMM: {collapse(answer[paths[i]])}"
        assert r["label"] == CLASSES[int(np.argmax(expected))] and np.allclose(probs(r), expected, atol=1e-5)
        if i not in (8, 9):
            assert r["label"] != zeroshot[paths[i]]["label"]
    assert [r["label"] for r in again.rows] == [r["label"] for r in preds.rows]


# --- TLAC --------------------------------------------------------------------------------------------------------
def _title(name: str) -> str:
    return name[:1].upper() + name[1:]


# Stage-2 answers naming the choice {c} (option number {n}) the way LMMs answer a "pick one option" question.
CHOICE_FORMS = [
    "I think it's {c}.",
    "**{C}**",
    "The best match is (B) {c} because the texture in the photo fits that description.",
    "Answer: {c}",
    "{U}.",
    "{c}\n\nExplanation: of the listed options, this one matches what the photo shows.",
    "Option {n}: {c}",
    "`{c}`",
    "{n}. {c} - it fits best.",
    "My choice: {C}, since it matches the fabric best.",
    "I choose option {n}.",
    "**{n}**",
]


def test_tlac_choice_overrides_clip_and_slac(tiny_clip, paths, zeroshot, pool, tmp_path):
    shas = [sha256_file(p) for p in paths]
    answer1 = {p: pick(pool, lambda c, p=p: c == zeroshot[p]["label"], i) for i, p in enumerate(paths)}  # agrees
    base, order, choice, answer2 = {}, {}, {}, {}
    for i, p in enumerate(paths):
        base[p] = (probs(zeroshot[p]) + pool[answer1[p]]) / 2
        order[p] = sorted(CLASSES, key=lambda c: (-base[p][CLASSES.index(c)], CLASSES.index(c)))
        choice[p] = order[p][-1]  # CLIP+SLAC's least likely class
        c, n = choice[p], order[p].index(choice[p]) + 1
        answer2[p] = CHOICE_FORMS[i % len(CHOICE_FORMS)].format(c=c, C=_title(c), U=c.upper(), n=n)
    stage1 = {s: reply(answer1[p]) for s, p in zip(shas, paths)}
    stage2 = {s: reply(answer2[p]) for s, p in zip(shas, paths)}
    with ScriptedLMMServer(by_image(stage1, marker=STAGE2, marked=stage2)) as server:
        preds = classify_with_lmm(paths, CLASSES, backbone=tiny_clip, lmm=lmm_for(server, tmp_path), method="tlac",
                                  templates=TEMPLATE)
    assert server.count == 2 * len(paths)
    asked = {q.sha256: q.prompt for q in server.requests if STAGE2 in q.prompt}
    for s, p, r in zip(shas, paths, preds.rows):
        # Stage 2 listed every class (top-3 of 3), ordered by (p_clip + p_slac) / 2, highest first.
        assert options_in(asked[s]) == order[p]
        assert r["label"] == choice[p] != zeroshot[p]["label"], answer2[p]
        assert r["decision"] == "tlac-choice"
        assert r["note"] == f"stage 1: {collapse(answer1[p])} | stage 2: {collapse(answer2[p])} | LMM chose {choice[p]}"
        expected = 0.5 * base[p] + 0.5 * np.eye(3)[CLASSES.index(choice[p])]
        assert np.allclose(probs(r), expected, atol=1e-5) and abs(sum(r["probabilities"].values()) - 1) < 1e-9


def test_tlac_candidates_numbers_none_and_garbage(tiny_clip, paths, zeroshot, pool, tmp_path):
    shas = [sha256_file(p) for p in paths]
    # Stage 1 points away from CLIP, so with top_k=1 the candidates are {CLIP's top-1, SLAC's top-1}.
    answer1 = {p: pick(pool, lambda c, p=p: c != zeroshot[p]["label"], i) for i, p in enumerate(paths)}
    slac_label = {p: CLASSES[int(np.argmax(pool[answer1[p]]))] for p in paths}
    base = {p: (probs(zeroshot[p]) + pool[answer1[p]]) / 2 for p in paths}
    order = {p: sorted({zeroshot[p]["label"], slac_label[p]}, key=lambda c: (-base[p][CLASSES.index(c)],
                                                                           CLASSES.index(c))) for p in paths}
    # kind -> (stage-2 answer from the two options, expected decision, expected choice or None)
    kinds = {
        "not-offered": (lambda o, p: f"The best match is {next(c for c in CLASSES if c not in o)}.", "tlac-unparsed",
                        None),  # a class that was not offered does not count
        "option-number": (lambda o, p: "I choose option 2 because the surface matches it.", "tlac-choice", 1),
        "number-and-name": (lambda o, p: f"1. {o[0]} - the texture matches.", "tlac-choice", 0),
        "number-name-disagree": (lambda o, p: f"1. {o[1]}", "tlac-unparsed", None),
        "sentence": (lambda o, p: f"The image most likely shows {_title(slac_label[p])}, judging by the texture.",
                     "tlac-choice", "slac"),
        "none": (lambda o, p: "None of these options fit; the fabric looks clean.", "tlac-none", None),
        "two-names": (lambda o, p: f"It could be {o[0]} or {o[1]}; hard to tell from this photo.", "tlac-unparsed",
                      None),
        "garbage": (lambda o, p: "It looks like a blue banana on a table.", "tlac-unparsed", None),
        "unusable": (lambda o, p: status(503), "tlac-unusable", None),
        "refusal": (lambda o, p: "I'm sorry, but I can't determine which option fits this image.", "tlac-unusable",
                    None),
        "stage1-failed": (lambda o, p: "Option 1.", "tlac-choice/stage1-fallback", 0),
        "stage1-refused": (lambda o, p: "Neither of them - the photo is too blurry to tell.",
                           "tlac-none/stage1-fallback", None),
    }
    assert len(kinds) == len(paths)
    kind_of = dict(zip(paths, kinds))
    stage1 = {s: reply(answer1[p]) for s, p in zip(shas, paths)}
    stage2, answer2 = {}, {}
    for s, p in zip(shas, paths):
        kind = kind_of[p]
        if kind == "stage1-failed":
            stage1[s] = status(500)  # stage 1 unusable: candidates from CLIP alone, the choice still counts
        if kind == "stage1-refused":
            stage1[s] = reply("I'm sorry, I cannot identify objects in images.")
        made = kinds[kind][0](order[p], p)
        stage2[s] = made if not isinstance(made, str) else reply(made)
        answer2[p] = made if isinstance(made, str) else None
    with ScriptedLMMServer(by_image(stage1, marker=STAGE2, marked=stage2)) as server:
        preds = classify_with_lmm(paths, CLASSES, backbone=tiny_clip, lmm=lmm_for(server, tmp_path), method="tlac",
                                  templates=TEMPLATE, top_k=1)
        asked = {q.sha256: q.prompt for q in server.requests if STAGE2 in q.prompt}
    for s, p, r in zip(shas, paths, preds.rows):
        kind = kind_of[p]
        _, decision, pick_ = kinds[kind]
        options = options_in(asked[s])
        assert r["decision"] == decision, (kind, answer2[p], r["note"])
        p_clip = probs(zeroshot[p])
        if kind.startswith("stage1-"):
            assert options == [zeroshot[p]["label"]]  # CLIP's top-1 alone
            assert r["note"].startswith("stage 1 fallback: ")
            b, combined = p_clip, "CLIP"
        else:
            assert options == order[p] and len(options) == 2
            assert r["note"].startswith(f"stage 1: {collapse(answer1[p])} | ")
            b, combined = base[p], "CLIP+SLAC"
        if pick_ is not None:
            expected = slac_label[p] if pick_ == "slac" else options[pick_]
            assert r["label"] == expected
            assert np.allclose(probs(r), 0.5 * b + 0.5 * np.eye(3)[CLASSES.index(expected)], atol=1e-5)
            assert r["note"].endswith(f" | LMM chose {expected}")
        else:
            assert r["label"] == CLASSES[int(np.argmax(b))]
            assert np.allclose(probs(r), b, atol=1e-5)
            why = {"tlac-none": "LMM said none", "tlac-unparsed": "answer not one of the options",
                   "tlac-unusable": "no usable answer"}[decision.split("/")[0]]
            assert r["note"].endswith(f" | {why} -> {combined}")
        if decision.startswith("tlac-unusable"):
            assert "| stage 2 fallback: " in r["note"]
            assert ("HTTP 503" if kind == "unusable" else "refusal") in r["note"]
        else:
            assert f"| stage 2: {collapse(answer2[p])} |" in r["note"]


def test_tlac_options_carry_descriptions_and_echoed_option_lines_parse(tiny_clip, paths, zeroshot_rich, pool_rich,
                                                                      tmp_path):
    """With a class file the options read "n. name: description"; an LMM that echoes a whole option line (number,
    name and description) or the name with the description still picks that option."""
    shas = [sha256_file(p) for p in paths]
    descs = {c.name: c.descriptions[0] for c in RICH}
    answer1 = {p: list(pool_rich)[i % len(pool_rich)] for i, p in enumerate(paths)}
    base, order, answer2 = {}, {}, {}
    for i, p in enumerate(paths):
        base[p] = (probs(zeroshot_rich[p]) + pool_rich[answer1[p]]) / 2
        order[p] = sorted(CLASSES, key=lambda c: (-base[p][CLASSES.index(c)], CLASSES.index(c)))
        c = order[p][-1]
        n = order[p].index(c) + 1
        answer2[p] = [f"{n}. {c}: {descs[c]}", f"**{_title(c)}** - {descs[c]}.",
                      f"The closest option is {n}. {c}: {descs[c]}"][i % 3]
    stage1 = {s: reply(answer1[p]) for s, p in zip(shas, paths)}
    stage2 = {s: reply(answer2[p]) for s, p in zip(shas, paths)}
    with ScriptedLMMServer(by_image(stage1, marker=STAGE2, marked=stage2)) as server:
        preds = classify_with_lmm(paths, RICH, backbone=tiny_clip, lmm=lmm_for(server, tmp_path), method="tlac",
                                  templates=RICH_TEMPLATES)
        asked = {q.sha256: q.prompt for q in server.requests if STAGE2 in q.prompt}
    for s, p, r in zip(shas, paths, preds.rows):
        lines = [line for line in asked[s].splitlines() if line[:1].isdigit()]
        assert lines == [f"{n}. {c}: {descs[c]}" for n, c in enumerate(order[p], 1)]
        c = order[p][-1]
        assert r["label"] == c and r["decision"] == "tlac-choice", answer2[p]
        assert np.allclose(probs(r), 0.5 * base[p] + 0.5 * np.eye(3)[CLASSES.index(c)], atol=1e-5)


# --- parse_choice --------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("answer, expected", [
    # a name inside a sentence, with other casing, markdown, quotes and a trailing explanation
    ("I think it's global.", ("choice", 2)),  # "local" inside "global" is not a mention of local
    ("Answer: local", ("choice", 1)),
    ("**Local**", ("choice", 1)),
    ("`nominal`", ("choice", 0)),
    ('"global"', ("choice", 2)),
    ("Global - the whole sheet is faded.", ("choice", 2)),
    ("Nominal - the weave is globally even.", ("choice", 0)),  # "globally" is not "global"
    ("NOMINAL.\n\nThe fabric looks clean and even.", ("choice", 0)),
    ("### Answer\n**Local** - there is a small stain near the centre.", ("choice", 1)),
    # option numbers, alone or with the name
    ("2.", ("choice", 1)),
    ("(2)", ("choice", 1)),
    ("#2", ("choice", 1)),
    ("2) local", ("choice", 1)),
    ("**2. local**", ("choice", 1)),
    ("Option 2: local", ("choice", 1)),
    ("Option 2 (local) - the stain covers one spot.", ("choice", 1)),
    ("I choose option 2.", ("choice", 1)),
    ("The best fit is option 3.", ("choice", 2)),
    ("Choice: 3", ("choice", 2)),
    ("3 - global", ("choice", 2)),
    ("Local (option 2)", ("choice", 1)),
    ("Local (option 3)", ("unparsed", None)),  # number and name disagree
    ("Option 2: global", ("unparsed", None)),
    ("It could be 2 or 3.", ("unparsed", None)),
    # "none" in its forms
    ("None of these options fit; the fabric looks clean.", ("none", None)),
    ("**None**", ("none", None)),
    ("Neither of them.", ("none", None)),
    ("No.", ("none", None)),
    ("The image shows none of the listed options.", ("none", None)),
    # two names, or a negated one: not a choice
    ("Not local; it's global.", ("unparsed", None)),
    ("It is either local or global, hard to tell.", ("unparsed", None)),
    ("Global, or maybe nominal if the lighting is uneven.", ("unparsed", None)),
])
def test_parse_choice_realistic_answers(answer, expected):
    assert parse_choice(answer, ["nominal", "local", "global"]) == expected


@pytest.mark.parametrize("answer, expected", [
    ("The best match is (B) local defect because the stain is confined to one spot.", ("choice", 1)),
    ("Local_Defect", ("choice", 1)),
    ("local-defect", ("choice", 1)),
    ("2. local defect: a small hole, stain or tear in one spot", ("choice", 1)),
    ("Answer: 2. local defect", ("choice", 1)),
    ("**Good** - no defects visible.", ("choice", 0)),
    ("It looks good.", ("choice", 0)),
    ("The image shows none of the listed defects.", ("none", None)),
    # the reason names the other option too, so the answer names two: not a choice
    ("The best match is (B) local defect because, unlike a global defect, it is confined to one spot.",
     ("unparsed", None)),
    ("Good. There is no local defect or global defect.", ("unparsed", None)),
    ("It's a defect.", ("unparsed", None)),  # "defect" is no option's name
])
def test_parse_choice_multiword_names(answer, expected):
    assert parse_choice(answer, ["good", "local defect", "global defect"]) == expected


@pytest.mark.parametrize("answer, expected", [
    ("OK part", ("choice", 0)),
    ("ok-part", ("choice", 0)),
    ("I see a scratch - a thin bright line across the metal surface", ("choice", 1)),
    ("A dent.", ("choice", 2)),
    ("Scratch - evident along the edge.", ("choice", 1)),  # "evident" is not "dent"
    ("Scratch (option 2)", ("choice", 1)),
    ("Option #3", ("choice", 2)),
    ("There is a scratch and a dent.", ("unparsed", None)),
])
def test_parse_choice_inspection_names(answer, expected):
    assert parse_choice(answer, ["ok_part", "scratch", "dent"]) == expected


@pytest.mark.parametrize("answer, names, right", [
    # Forms parse_choice does not claim to read (plurals, adverbs, letters, paraphrases): whatever it makes of
    # them, it must not pick another option than the one meant.
    ("Scratches", ["ok_part", "scratch", "dent"], 1),
    ("Local defects.", ["good", "local defect", "global defect"], 1),
    ("Locally damaged", ["nominal", "local", "global"], 1),
    ("globally distorted", ["nominal", "local", "global"], 2),
    ("I think it's global.", ["good", "local defect", "global defect"], 2),
    ("Option B", ["nominal", "local", "global"], 1),
    ("The part is OK.", ["ok_part", "scratch", "dent"], 0),
    ("Nothing matches.", ["nominal", "local", "global"], None),
    ("1 scratch visible", ["ok_part", "scratch", "dent"], 1),
])
def test_parse_choice_unclaimed_forms_never_pick_a_wrong_option(answer, names, right):
    kind, index = parse_choice(answer, names)
    assert kind in ("choice", "none", "unparsed")
    if kind == "choice":
        assert index == right
    if kind == "none":
        assert right is None


@pytest.mark.parametrize("answer", ["Answer: 2", "The answer is 2.", "**Answer:** 2"])
def test_parse_choice_answer_prefixed_number(answer):
    assert parse_choice(answer, ["nominal", "local", "global"]) == ("choice", 1)


@pytest.mark.parametrize("answer", ["Answer: 3 (local)", "The answer is 3, local."])
def test_parse_choice_rejects_disagreeing_number_after_answer_prefix(answer):
    assert parse_choice(answer, ["nominal", "local", "global"]) == ("unparsed", None)


def test_parse_choice_prefers_the_longer_name():
    names = ["defect", "local defect", "ok_part"]
    assert parse_choice("It shows a local defect.", names) == ("choice", 1)
    assert parse_choice("ok part", names) == ("choice", 2)
    assert parse_choice("a defect", names) == ("choice", 0)
    assert parse_choice("**Local defect** - a small hole, the rest of the part is fine.", names) == ("choice", 1)
    assert parse_choice("There is a defect, but I can't tell where.", names) == ("choice", 0)
    assert parse_choice("A local defect, so the part is not an ok part.", names) == ("unparsed", None)


# --- the head as a zero-shot head, the CLI --------------------------------------------------------------------------
def test_slac_head_is_a_zeroshot_head_for_features(tiny_clip):
    support = Support.text_only(CLASSES, tiny_clip)
    slac = create_head("slac", classes=CLASSES, templates=TEMPLATE).fit(support)
    zs = create_head("zeroshot", classes=CLASSES, templates=TEMPLATE).fit(support)
    feats = np.random.default_rng(0).normal(size=(5, slac.weights_.shape[0])).astype(np.float32)
    assert np.allclose(slac.predict_proba(feats), zs.predict_proba(feats))
    tensors, config = slac.state()
    loaded = type(slac).from_state(tensors, json.loads(json.dumps(config)))
    assert loaded.prompt == slac.prompt and np.allclose(loaded.predict_proba(feats), zs.predict_proba(feats))
    answers = ANSWERS[:3]
    with pytest.raises(ValueError, match="bind"):
        loaded.answer_logits(answers)
    assert np.allclose(loaded.bind(tiny_clip).answer_logits(answers).numpy(), slac.answer_logits(answers).numpy())
    expected = expected_slac(tiny_clip, CLASSES, TEMPLATE, answers)
    assert np.allclose(loaded.answer_logits(answers).softmax(-1).numpy(), expected, atol=1e-5)


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


def test_cli_classify_and_eval_with_loopback_lmm(tmp_path, tiny_clip_config, tiny_clip, textile_subset, pool,
                                                 monkeypatch, capsys):
    truth = {str(p): p.parent.name for p in textile_subset.rglob("*.jpg")}
    # Per image a realistic answer that maps (as computed here) to its true class, and a stage-2 sentence naming it.
    answer1 = {p: pick(pool, lambda c, t=c: c == t, i) for i, (p, c) in enumerate(sorted(truth.items()))}
    forms = ["I think it's {c}.", "**{C}**", "Answer: {c}", "The best match is {c}, judging by the weave."]
    answer2 = {p: forms[i % len(forms)].format(c=c, C=_title(c)) for i, (p, c) in enumerate(sorted(truth.items()))}
    script = {sha256_file(p): reply(answer1[p]) for p in truth}
    stage2 = {sha256_file(p): reply(answer2[p]) for p in truth}
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
    assert all(r["label"] == truth[r["path"]] and r["note"] == f"LMM: {collapse(answer1[r['path']])}" for r in rows)
    page = next(report.glob("*.html")).read_text()
    assert all(html.escape(f"LMM: {collapse(a)}", quote=True) in page for a in answer1.values())
    m = json.loads(metrics.read_text())
    assert m["accuracy"] == 1.0 and m["method"] == "tlac" and m["decisions"] == {"tlac-choice": len(truth)}


@pytest.mark.parametrize("args, message", [
    (["--method", "slac"], "--lmm-url"),
    (["--method", "slac", "--lmm-url", "http://127.0.0.1:9"], "--lmm-model"),
    (["--lmm-url", "http://127.0.0.1:9", "--lmm-model", "m"], "only to --method slac or tlac"),
    (["--method", "magic"], "unknown method"),
])
def test_cli_lmm_option_errors(tmp_path, textile_subset, tiny_clip_config, monkeypatch, capsys, args, message):
    monkeypatch.setenv("FEWVISION_CACHE_DIR", str(tmp_path))
    code, err = run_cli(monkeypatch, capsys, "classify", textile_subset / "local", "--classes", "a,b",
                        "--backbone", f"openclip:{tiny_clip_config}", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_unreadable_files_are_skipped_before_any_request(tiny_clip, paths, pool, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    answer = pick(pool, lambda c: c == "global", 0)
    with ScriptedLMMServer(lambda req: reply(answer)) as server:
        preds = classify_with_lmm([paths[0], str(broken), paths[1]], CLASSES, backbone=tiny_clip, method="slac",
                                  lmm=lmm_for(server, tmp_path), templates=TEMPLATE)
    assert [r["path"] for r in preds.rows] == [paths[0], paths[1]] and all(r["label"] == "global" for r in preds.rows)
    assert [s.path for s in preds.skipped] == [str(broken)] and server.count == 2
