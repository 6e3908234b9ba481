"""BLIP-2 image-text retrieval as a zero-shot backbone, on a tiny random Blip2Config saved locally (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "local", "global", "nominal", "defect",
         "fabric", "hole", "stain", ".", "the", "with", "clean"]
QUERIES = 4


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    from transformers import (
        BertTokenizer,
        Blip2Config,
        Blip2ForImageTextRetrieval,
        Blip2Processor,
        BlipImageProcessor,
    )

    vision = dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37)
    qformer = dict(vocab_size=len(WORDS) + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=37, encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=0,
                   cross_attention_frequency=1, use_qformer_text_input=True)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=QUERIES,
                         image_text_hidden_size=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-blip2-itm")
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():  # random queries (their initial value is zero: every query would be the same)
        model.query_tokens.normal_(0, 1)
    model.save_pretrained(folder)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                   tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip2(blip2_dir):
    from fewvision.backbones import create_backbone

    return create_backbone(f"hf:{blip2_dir}")


@pytest.fixture(scope="module")
def pixels(blip2, textile_subset):
    from fewvision.io.images import load_image

    files = [sorted((textile_subset / c).glob("*.jpg"))[0] for c in ("nominal", "local", "global")]
    return torch.stack([blip2.preprocess(load_image(p)) for p in files])


TEXTS = ["a photo of local defect .", "a photo of clean fabric .", "the fabric with a hole"]


def _forward(blip2, pixels, texts, itm: bool):
    tokens = blip2.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return blip2.model(pixel_values=pixels, input_ids=tokens["input_ids"],
                           attention_mask=tokens["attention_mask"], use_image_text_matching_head=itm)


def test_itc_is_the_best_query_cosine_of_transformers_forward(blip2, pixels):
    from fewvision.backbones.blip2 import Blip2Backbone
    from fewvision.heads.zeroshot import class_similarity

    assert isinstance(blip2, Blip2Backbone) and blip2.image_vectors == QUERIES and blip2.id.startswith("hf-blip2-")
    images, texts = blip2.encode_images(pixels), blip2.encode_text(TEXTS)
    assert images.shape == (3, QUERIES * 16) and texts.shape == (3, 16)
    assert torch.allclose(images.view(3, QUERIES, 16).norm(dim=-1), torch.ones(3, QUERIES), atol=1e-5)
    reference = _forward(blip2, pixels, TEXTS, itm=False).logits_per_image
    assert torch.allclose(class_similarity(images, texts.T), reference, atol=1e-5)
    # not the similarity of the mean query: the maximum is what BLIP-2 takes
    mean = torch.nn.functional.normalize(images.view(3, QUERIES, 16).mean(1), dim=-1) @ texts.T
    assert not torch.allclose(mean, reference, atol=1e-3)


def test_itm_scores_match_transformers_forward_per_pair(blip2, pixels):
    scores = blip2.itm_scores(pixels, TEXTS[:2])
    assert scores.shape == (3, 2)
    for i in range(3):
        for j, text in enumerate(TEXTS[:2]):
            logits = _forward(blip2, pixels[i:i + 1], [text], itm=True).logits_per_image
            assert float(scores[i, j]) == pytest.approx(float(torch.softmax(logits, -1)[0, 1]), abs=1e-5)


def test_zero_shot_and_reranking_run_and_prompt_learners_refuse(blip2, textile_subset):
    from fewvision.backbones.base import BackboneError
    from fewvision.io.images import load_image
    from fewvision.tasks.fewshot import fit
    from fewvision.tasks.zeroshot import classify

    classes, template = ["nominal", "local", "global"], "a photo of {} ."
    paths = [str(p) for c in classes for p in sorted((textile_subset / c).glob("*.jpg"))[:2]]
    plain = classify(paths, classes, backbone=blip2, templates=[template])
    images = blip2.encode_images(torch.stack([blip2.preprocess(load_image(p)) for p in paths]))
    reference = _forward(blip2, torch.stack([blip2.preprocess(load_image(p)) for p in paths]),
                         [template.format(c) for c in classes], itm=False).logits_per_image
    expected = torch.softmax(blip2.logit_scale * reference, dim=-1).numpy()
    got = np.array([[r["probabilities"][c] for c in classes] for r in plain.rows])
    assert images.shape[1] == QUERIES * 16 and np.allclose(got, expected, atol=1e-4)
    ranked = classify(paths, classes, backbone=blip2, templates=[template], rerank="itm", rerank_k=3)
    for path, row, logits in zip(paths, ranked.rows, reference):
        pixel = blip2.preprocess(load_image(path))[None]
        score = [float(_forward(blip2, pixel, [template.format(c)], itm=True).logits_per_image[0, 1]) + float(cos)
                 for c, cos in zip(classes, logits)]
        assert row["top_label"] == classes[int(np.argmax(score))]
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(BackboneError, match="method 'coop' combines one image vector with the text's"):
        fit(str(textile_subset), "coop", blip2, shots=2)


def test_tip_and_clip_adapter_use_every_query_as_blip2_does(blip2, pixels, textile_subset):
    """Tip-Adapter: the text term is the best query's cosine per class, the cache term eq. 4 with the mean of the
    queries' cosines with a key's; CLIP-Adapter: the MLP on each query, then the best query per class. Checked
    against both formulas written out query by query."""
    from fewvision.tasks.fewshot import fit

    feats = blip2.encode_images(pixels).float()  # [3, Q * 16], each query a unit vector
    q = feats.view(len(feats), QUERIES, 16)
    tip = fit(str(textile_subset), "tip", blip2, shots=2, n_views=2, use_cache=False).head
    keys = tip.keys_.view(len(tip.keys_), QUERIES, 16)
    assert torch.allclose(keys.norm(dim=-1), torch.ones(len(keys), QUERIES), atol=1e-5)  # normalised per query
    text = torch.tensor([[tip.logit_scale_ * max(float(q[i, v] @ tip.text_weights_[:, c]) for v in range(QUERIES))
                          for c in range(tip.text_weights_.shape[1])] for i in range(len(q))])
    mean_cos = torch.stack([torch.stack([sum(q[i, v] @ keys[k, v] for v in range(QUERIES)) / QUERIES
                                         for k in range(len(keys))]) for i in range(len(q))])
    want = text + tip.alpha_ * torch.exp(-tip.beta_ * (1 - mean_cos)) @ tip.values_
    assert torch.allclose(tip.logits(feats), want, atol=1e-4)
    assert (mean_cos <= 1 + 1e-5).all() and (mean_cos >= -1 - 1e-5).all()

    adapter = fit(str(textile_subset), "clip-adapter", blip2, shots=2, epochs=3, use_cache=False).head
    r = adapter.ratio
    per_query = []
    for i in range(len(q)):
        best = []
        for v in range(QUERIES):
            x = q[i, v]
            mixed = r * torch.relu(torch.relu(x @ adapter.down_.T) @ adapter.up_.T) + (1 - r) * x
            best.append(adapter.logit_scale_ * (mixed / mixed.norm()) @ adapter.text_weights_)
        per_query.append(torch.stack(best).amax(0))
    assert torch.allclose(adapter.logits(feats), torch.stack(per_query), atol=1e-4)
