"""The OpenAI-compatible LMM client against a real HTTP server on 127.0.0.1 (tests/lmm_server.py)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from lmm_server import ScriptedLMMServer, by_image, raw, reply, slow, status
from PIL import Image

from fewvision.io.images import sha256_file
from fewvision.lmm import ChatCompletionsClient, create_lmm, is_refusal
from fewvision.lmm.answer_cache import AnswerCache
from fewvision.lmm.client import chat_completions_url


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def client(server, tmp_path, **kw) -> ChatCompletionsClient:
    params = dict(timeout=2.0, retries=2, backoff=0.01, concurrency=2, cache_dir=str(tmp_path / "cache"))
    params.update(kw)
    return ChatCompletionsClient(server.url, "scripted-vlm", **params)


def test_endpoint_from_base_url():
    assert chat_completions_url("http://localhost:11434") == "http://localhost:11434/v1/chat/completions"
    assert chat_completions_url("http://localhost:11434/v1/") == "http://localhost:11434/v1/chat/completions"
    assert chat_completions_url("https://api.openai.com/v1/chat/completions") == \
        "https://api.openai.com/v1/chat/completions"
    with pytest.raises(ValueError, match="http"):
        chat_completions_url("localhost:11434")


def test_request_format_and_api_key(images, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("FEWVISION_LMM_API_KEY", "sk-test-123")
    sha = sha256_file(images[0])
    with ScriptedLMMServer(by_image({sha: reply("a woven fabric, with a hole")})) as server:
        answer = client(server, tmp_path).ask(images[0], "What is this?")
    assert answer.usable and answer.text == "a woven fabric, with a hole" and not answer.cached
    (req,) = server.requests
    assert req.path == "/v1/chat/completions"
    assert req.sha256 == sha and req.mime == "image/jpeg"  # the file's own bytes, as a base64 data URL
    assert req.prompt == "What is this?" and req.model == "scripted-vlm" and req.temperature == 0
    assert req.authorization == "Bearer sk-test-123"


def test_openai_key_is_the_fallback_and_tiff_is_sent_as_png(tmp_path, monkeypatch):
    monkeypatch.delenv("FEWVISION_LMM_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    tif = tmp_path / "gray16.tif"
    Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 200)).save(tif)
    with ScriptedLMMServer(lambda req: reply("a gradient")) as server:
        assert client(server, tmp_path).ask(tif, "q").text == "a gradient"
    (req,) = server.requests
    assert req.authorization == "Bearer sk-openai" and req.mime == "image/png"


def test_5xx_is_retried_then_succeeds(images, tmp_path):
    sha = sha256_file(images[0])
    script = by_image({sha: [status(500), status(503), reply("fabric with a stain")]})
    with ScriptedLMMServer(script) as server:
        answer = client(server, tmp_path, retries=3).ask(images[0], "q")
    assert answer.usable and answer.text == "fabric with a stain"
    assert server.count == 3


def test_5xx_until_giving_up(images, tmp_path):
    with ScriptedLMMServer(lambda req: status(500, "model crashed")) as server:
        answer = client(server, tmp_path, retries=2).ask(images[0], "q")
    assert not answer.usable
    assert "HTTP 500" in answer.error and "model crashed" in answer.error and "3 attempts" in answer.error
    assert server.count == 3  # the first try and two retries, no more


def test_4xx_is_not_retried(images, tmp_path):
    with ScriptedLMMServer(lambda req: status(400, "model does not support images")) as server:
        answer = client(server, tmp_path, retries=3).ask(images[0], "q")
    assert not answer.usable and answer.error.startswith("HTTP 400") and "support images" in answer.error
    assert server.count == 1


def test_slow_answer_times_out_after_retries(images, tmp_path):
    with ScriptedLMMServer(lambda req: slow(1.0, "late"), max_delay=1.0) as server:
        answer = client(server, tmp_path, timeout=0.2, retries=1).ask(images[0], "q")
    assert not answer.usable and "timed out after 0.2 s" in answer.error
    assert server.count == 2


def test_slow_then_fast_recovers(images, tmp_path):
    sha = sha256_file(images[0])
    with ScriptedLMMServer(by_image({sha: [slow(1.0), reply("a knit")]}), max_delay=1.0) as server:
        answer = client(server, tmp_path, timeout=0.2, retries=1).ask(images[0], "q")
    assert answer.usable and answer.text == "a knit" and server.count == 2


def test_connection_refused_is_reported(images, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = ChatCompletionsClient(f"http://127.0.0.1:{port}", "m", retries=1, backoff=0.01, cache_dir=str(tmp_path))
    answer = c.ask(images[0], "q")
    assert not answer.usable and "cannot connect" in answer.error and c.requests == 2


@pytest.mark.parametrize("body, reason", [
    (b'{"choices": [{"message": {"content": "trunc', "malformed JSON"),
    (b'{"object": "error"}', "no choices"),
    (b'{"choices": [{"message": {"role": "assistant", "content": "   "}}]}', "empty answer"),
    (b'{"choices": [{"message": {"role": "assistant", "content": null}}]}', "empty answer"),
])
def test_unusable_responses_are_not_cached(images, tmp_path, body, reason):
    with ScriptedLMMServer(lambda req: raw(body)) as server:
        c = client(server, tmp_path)
        first = c.ask(images[0], "q")
        second = c.ask(images[0], "q")
    assert not first.usable and reason in first.error
    assert not second.usable and not second.cached
    assert server.count == 2  # one request each (a 200 with a bad body is not retried), nothing cached


def test_refusal_is_unusable_and_cached(images, tmp_path):
    with ScriptedLMMServer(lambda req: reply("I'm sorry, but I can't help with identifying this.")) as server:
        c = client(server, tmp_path)
        first = c.ask(images[0], "q")
        second = c.ask(images[0], "q")
    assert not first.usable and first.error.startswith("refusal")
    assert not second.usable and second.cached and server.count == 1


@pytest.mark.parametrize("text", [
    "I'm sorry, I cannot help with that.",
    "Sorry, I can't assist with this request.",
    "I cannot identify people or objects in this image.",
    "I am unable to analyze images.",
    "I'm not able to view images.",
    "As an AI language model, I do not see images.",
    "I apologize, but this request is not supported.",
])
def test_refusal_heuristic_positives(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "A piece of woven fabric. Attribute: a small hole near the centre.",
    "I can't see any defect; the fabric looks clean and uniform.",
    "The object is a textile; its attribute is that it is not damaged.",
    "Fabric with a stain. Sorry, the image is a bit blurry.",  # apology outside the first sentence
])
def test_refusal_heuristic_negatives(text):
    assert not is_refusal(text)


def test_second_run_sends_zero_requests(images, tmp_path):
    shas = [sha256_file(p) for p in images]
    answers = {s: reply(f"answer {i}") for i, s in enumerate(shas)}
    items = [(str(p), "Which object?") for p in images]
    with ScriptedLMMServer(by_image(answers)) as server:
        first = client(server, tmp_path).ask_many(items)
        assert server.count == len(images)
        second = client(server, tmp_path).ask_many(items)  # a new client: the answers come from disk
        assert server.count == len(images)
        other_prompt = client(server, tmp_path).ask_many([(p, "Another question?") for p, _ in items[:2]])
        other_model = ChatCompletionsClient(server.url, "another-model", cache_dir=str(tmp_path / "cache"),
                                            backoff=0.01).ask_many(items[:1])
    assert [a.text for a in first] == [f"answer {i}" for i in range(len(images))]
    assert [a.text for a in second] == [a.text for a in first] and all(a.cached for a in second)
    assert not any(a.cached for a in other_prompt) and not other_model[0].cached
    assert server.count == len(images) + 3
    assert len(AnswerCache(str(tmp_path / "cache"))) == len(images) + 3


def test_no_cache_sends_again(images, tmp_path):
    with ScriptedLMMServer(lambda req: reply("x")) as server:
        client(server, tmp_path, use_cache=False).ask(images[0], "q")
        client(server, tmp_path, use_cache=False).ask(images[0], "q")
    assert server.count == 2


def test_concurrency_is_bounded_and_order_kept(images, tmp_path):
    lock = threading.Lock()
    state = {"now": 0, "max": 0}

    def script(req):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.15)
        with lock:
            state["now"] -= 1
        return reply(req.sha256)

    with ScriptedLMMServer(script) as server:
        answers = client(server, tmp_path, concurrency=3).ask_many([(str(p), "q") for p in images])
    assert [a.text for a in answers] == [sha256_file(p) for p in images]
    assert 2 <= state["max"] <= 3


def test_unreadable_image_sends_nothing(tmp_path):
    with ScriptedLMMServer(lambda req: reply("x")) as server:
        answer = client(server, tmp_path).ask(tmp_path / "missing.jpg", "q")
    assert not answer.usable and "cannot read image" in answer.error and server.count == 0


def test_create_lmm_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="model"):
        create_lmm("http://127.0.0.1:9", None)
    with pytest.raises(ValueError, match="expected an http"):
        create_lmm("ftp://x", "m")
    with pytest.raises(ValueError, match="concurrency"):
        create_lmm("http://127.0.0.1:9", "m", concurrency=0)


# --- the local transformers backend, on a tiny random LLaVA built offline -------------------------------------------

_LLAVA_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "user", ":", "assistant", "which", "object", "is",
                "present", "in", "the", "image", "?", "fabric", "hole", "a", "with", "also", "tell", "its",
                "attribute", "."]
_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                  "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(_LLAVA_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>", additional_special_tokens=["<image>"])
    config = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, image_size=32, patch_size=8,
                           num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, projection_dim=16),
        image_token_index=4, vision_feature_layer=-1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llava")
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                   tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                   chat_template=_CHAT_TEMPLATE, num_additional_image_tokens=1).save_pretrained(folder)
    return folder


def test_local_vlm_answers_greedily_and_caches(tiny_llava, images, tmp_path):
    import torch

    from fewvision.io.images import load_image
    from fewvision.lmm.local import LocalVLM

    lmm = create_lmm("local", str(tiny_llava), cache_dir=str(tmp_path / "cache"))
    assert isinstance(lmm, LocalVLM) and lmm.model_id.startswith("local:")
    question = "Which object is present in the image? Also tell its attribute."
    first = lmm.ask(images[0], question)
    # The same generation done by hand with transformers: greedy, the chat template, the new tokens only.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = lmm.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = lmm.processor(images=[load_image(images[0])], text=[text], return_tensors="pt")
    with torch.inference_mode():
        out = lmm.model.generate(**inputs, max_new_tokens=lmm.max_new_tokens, do_sample=False)
    expected = lmm.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert first.text == expected.strip() and first.text and first.usable
    assert lmm.requests == 1
    again = LocalVLM(str(tiny_llava), cache_dir=str(tmp_path / "cache")).ask(images[0], question)
    assert again.cached and again.text == first.text
    answers = lmm.ask_many([(str(p), question) for p in images[:3]])
    assert lmm.requests == 3 and answers[0].cached and all(a.text for a in answers)


def test_local_vlm_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    from fewvision.backbones.base import WeightsUnavailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="HuggingFaceTB/SmolVLM-256M-Instruct"):
        create_lmm("local", "HuggingFaceTB/SmolVLM-256M-Instruct", cache_dir=str(tmp_path))


# --- BLIP-2 captioning (Blip2ForConditionalGeneration) as the in-process LMM ------------------------------------------
_BLIP2_WORDS = ["<pad>", "</s>", "<unk>", "<image>", "Question:", "Answer:", "which", "object", "is", "present", "in",
                "the", "image?", "a", "hole", "stain", "clean", "fabric", "defect", "."]


def _tiny_blip2(folder: Path, positions: int = 128) -> Path:
    """A tiny random BLIP-2 with an OPT language model (4 query tokens, ``positions`` positions)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_BLIP2_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        bos_token="</s>", unk_token="<unk>", additional_special_tokens=["<image>"])
    text = OPTConfig(vocab_size=len(_BLIP2_WORDS), hidden_size=32, num_hidden_layers=1, ffn_dim=37,
                     num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=positions, pad_token_id=0,
                     bos_token_id=1, eos_token_id=1)
    config = Blip2Config(vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=37),
                         qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=37, encoder_hidden_size=32, vocab_size=30),
                         text_config=text.to_dict(), num_query_tokens=4, image_token_index=3)
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).eval().save_pretrained(folder)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                   num_query_tokens=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory) -> Path:
    return _tiny_blip2(tmp_path_factory.mktemp("tiny-blip2"))


def test_a_generation_past_the_models_positions_is_an_answer_error_not_a_crash(tmp_path, images):
    """16 positions: the 4 query tokens, the question and 64 new tokens do not fit; the answer says so in one line
    (SLAC/TLAC then fall back to CLIP for that image) and the next image is asked as usual."""
    lmm = create_lmm("local", str(_tiny_blip2(tmp_path / "short", positions=16)), use_cache=False)
    answers = lmm.ask_many([(str(p), "which object is present in the image?") for p in images[:2]])
    assert all(a.error and a.error.startswith("local generation failed") and "\n" not in a.error for a in answers)


def test_blip2_answers_with_its_papers_question_prompt_and_serves_slac(tiny_blip2, images, tiny_clip, tmp_path):
    """The answer is transformers' own greedy generation for "Question: {q} Answer:" (BLIP-2's zero-shot VQA prompt
    for its OPT models), the query tokens put in front by the processor; SLAC then reads that answer."""
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from fewvision.heads import create_head
    from fewvision.io.images import load_image
    from fewvision.lmm.local import LocalVLM
    from fewvision.tasks.zeroshot import classify_with_lmm

    lmm = create_lmm("local", str(tiny_blip2), use_cache=False)
    assert isinstance(lmm, LocalVLM)
    question = "which object is present in the image?"
    answer = lmm.ask(images[0], question)
    processor = Blip2Processor.from_pretrained(tiny_blip2)
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_blip2).eval()
    inputs = processor(images=[load_image(images[0])], text=[f"Question: {question} Answer:"], return_tensors="pt")
    assert inputs["input_ids"][0, :4].tolist() == [3] * 4  # the processor's own query-token slots
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=lmm.max_new_tokens, do_sample=False)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert answer.error is None and answer.text == expected.strip() and answer.text
    preds = classify_with_lmm([str(p) for p in images[:2]], ["hole", "clean fabric"], backbone=tiny_clip, lmm=lmm,
                              method="slac", use_cache=False)
    slac_answer = lmm.ask(images[0], create_head("slac").prompt)  # SLAC's own question
    assert slac_answer.text and preds.rows[0]["note"].startswith("LMM: " + slac_answer.text[:20])
