"""BLIP image-text retrieval as a zero-shot backbone, on a tiny random BlipConfig saved locally (no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "local", "global", "nominal", "defect",
         "fabric", "hole", "stain", ".", "the", "with", "clean"]


def _save_tiny_blip(folder, architecture: str = "retrieval"):
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    text = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=37, max_position_embeddings=64, encoder_hidden_size=32, pad_token_id=0,
                bos_token_id=2, sep_token_id=3, eos_token_id=3)
    vision = dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=16, image_text_hidden_size=16)
    torch.manual_seed(0)
    cls = BlipForImageTextRetrieval if architecture == "retrieval" else BlipForConditionalGeneration
    cls(config).eval().save_pretrained(folder)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return _save_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture(scope="module")
def blip(blip_dir):
    from fewvision.backbones import create_backbone

    return create_backbone(f"hf:{blip_dir}")


@pytest.fixture(scope="module")
def pixels(blip, textile_subset):
    from fewvision.io.images import load_image

    files = [sorted((textile_subset / c).glob("*.jpg"))[0] for c in ("nominal", "local", "global")]
    return torch.stack([blip.preprocess(load_image(p)) for p in files])


def test_hf_spec_with_a_blip_config_gives_the_blip_backbone(blip, blip_dir):
    from fewvision.backbones.blip import BlipBackbone

    assert isinstance(blip, BlipBackbone) and blip.has_text and blip.input_size == (32, 32)
    assert json.loads((blip_dir / "config.json").read_text())["model_type"] == "blip"
    assert blip.id.startswith("hf-blip-")
    assert blip.logit_scale == pytest.approx(1 / 0.07, rel=1e-3)


def test_itc_embeddings_match_transformers_forward(blip, pixels):
    texts = ["a photo of local defect .", "a photo of clean fabric .", "the fabric with a hole"]
    img = blip.encode_images(pixels)
    txt = blip.encode_text(texts)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    tokens = blip.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = blip.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         pixel_values=pixels, use_itm_head=False).itm_score
    assert torch.allclose(img @ txt.T, ref, atol=1e-5)
    assert not torch.allclose(txt[0], txt[1], atol=1e-3)  # the texts are actually tokenised (no all-[UNK])


def test_itm_scores_match_transformers_forward_per_pair(blip, pixels):
    texts = ["a photo of local defect .", "clean fabric"]
    scores = blip.itm_scores(pixels, texts)
    assert scores.shape == (3, 2) and bool(((scores > 0) & (scores < 1)).all())
    for i in range(3):
        for j, text in enumerate(texts):
            tokens = blip.tokenizer([text], return_tensors="pt")
            with torch.inference_mode():
                logits = blip.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                    pixel_values=pixels[i:i + 1], use_itm_head=True).itm_score
            assert float(scores[i, j]) == pytest.approx(float(torch.softmax(logits, -1)[0, 1]), abs=1e-5)


def test_zero_shot_head_and_cache_work_unchanged(blip, textile_subset):
    from fewvision.heads import create_head
    from fewvision.heads.support import Support
    from fewvision.tasks.zeroshot import classify

    classes = ["nominal", "local", "global"]
    paths = [str(p) for c in classes for p in sorted((textile_subset / c).glob("*.jpg"))[:2]]
    preds = classify(paths, classes, backbone=blip, templates=["a photo of {} ."])
    again = classify(paths, classes, backbone=blip, templates=["a photo of {} ."])
    assert preds.encoded == len(paths) and again.encoded == 0  # the feature cache is keyed by the BLIP id
    head = create_head("zeroshot", classes=classes, templates=["a photo of {} ."]).fit(
        Support.text_only(classes, blip))
    from fewvision.io.images import load_image

    feats = blip.encode_images(torch.stack([blip.preprocess(load_image(p)) for p in paths]))
    expected = torch.softmax(blip.logit_scale * feats @ blip.encode_text([f"a photo of {c} ." for c in classes]).T, -1)
    got = np.array([[r["probabilities"][c] for c in classes] for r in preds.rows])
    assert np.allclose(got, expected.numpy(), atol=1e-4)
    assert np.allclose(head.predict_proba(feats), expected.numpy(), atol=1e-4)


def test_patch_features_form_a_grid(blip, pixels):
    assert tuple(blip.patch_features(pixels).shape) == (3, 32, 4, 4)


def test_a_captioning_blip_is_refused_clearly(tmp_path):
    from fewvision.backbones import create_backbone
    from fewvision.backbones.base import BackboneError

    folder = _save_tiny_blip(tmp_path / "caption", architecture="caption")
    with pytest.raises(BackboneError, match="BlipForImageTextRetrieval"):
        create_backbone(f"hf:{folder}")


def test_offline_hub_id_fails_fast_and_clearly(tmp_path, monkeypatch):
    from fewvision.backbones import create_backbone
    from fewvision.backbones.base import WeightsUnavailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network attempt: the failure is immediate
    with pytest.raises(WeightsUnavailable) as err:
        create_backbone("hf:Salesforce/blip-itm-base-coco", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "hf:Salesforce/blip-itm-base-coco" in message and "--weights" in message and "\n" not in message


def _save_tiny_hf_clip(tmp_path):
    """A random transformers CLIP with an offline tokenizer, saved as a model folder."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>", "a</w>", "photo</w>", "of</w>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=20, max_position_embeddings=16),
                        vision_config=dict(hidden_size=16, image_size=32, patch_size=8, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=20), projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder, model, processor, tokenizer


def test_hf_clip_folders_still_load_as_clip(tmp_path):
    from fewvision.backbones import create_backbone
    from fewvision.backbones.hf import HFClipBackbone

    folder, _, _, _ = _save_tiny_hf_clip(tmp_path)
    assert isinstance(create_backbone(f"hf:{folder}"), HFClipBackbone)


def test_hf_clip_backbone_matches_transformers(tmp_path):
    import torch
    from PIL import Image

    from fewvision.backbones import create_backbone

    folder, model, processor, tokenizer = _save_tiny_hf_clip(tmp_path)
    bb = create_backbone(f"hf:{folder}")

    image = Image.new("RGB", (50, 40), (200, 30, 90))
    pixels = bb.preprocess(image)[None]
    with torch.no_grad():
        ref_pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        ref_image = model.get_image_features(pixel_values=ref_pixels)
        ref_image = ref_image if torch.is_tensor(ref_image) else ref_image.pooler_output
        tokens = tokenizer(["a photo", "of a photo"], padding=True, return_tensors="pt")
        ref_text = model.get_text_features(**tokens)
        ref_text = ref_text if torch.is_tensor(ref_text) else ref_text.pooler_output
    torch.testing.assert_close(pixels, ref_pixels)
    torch.testing.assert_close(bb.encode_images(pixels), torch.nn.functional.normalize(ref_image, dim=-1))
    torch.testing.assert_close(bb.encode_text(["a photo", "of a photo"]), torch.nn.functional.normalize(ref_text, dim=-1))
    assert bb.patch_features(pixels).shape == (1, 16, 4, 4)
    assert bb.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))


def test_itm_reranking_orders_each_shortlist_as_blips_retrieval_score_says(blip_dir, textile_subset):
    """k = 2 of 3 classes: the shortlist's ITC probability mass is shared by softmax(ITM match logit + ITC cosine),
    both taken from transformers' own forward; the third class keeps its ITC probability. The tiny random BLIP's
    ITM head is sharpened (weights x100) so that its scores, not ITC's, decide."""
    from fewvision.backbones import create_backbone
    from fewvision.io.images import load_image
    from fewvision.tasks.zeroshot import classify

    blip = create_backbone(f"hf:{blip_dir}")
    with torch.no_grad():
        blip.model.itm_head.weight.mul_(100)

    classes, template = ["nominal", "local", "global"], "a photo of {} ."
    paths = [str(p) for c in classes for p in sorted((textile_subset / c).glob("*.jpg"))[:4]]
    plain = classify(paths, classes, backbone=blip, templates=[template])
    ranked = classify(paths, classes, backbone=blip, templates=[template], rerank="itm", rerank_k=2)
    changed = 0
    for path, before, after in zip(paths, plain.rows, ranked.rows):
        itc = np.array([before["probabilities"][c] for c in classes])
        short = np.argsort(-itc)[:2]
        pixels = blip.preprocess(load_image(path))[None]
        score = []
        for c in short:
            tokens = blip.tokenizer([template.format(classes[c])], return_tensors="pt")
            with torch.inference_mode():
                args = dict(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                            pixel_values=pixels)
                match = float(blip.model(**args, use_itm_head=True).itm_score[0, 1])
                cosine = float(blip.model(**args, use_itm_head=False).itm_score[0, 0])
            score.append(match + cosine)
        share = np.exp(np.array(score) - max(score))
        want = itc.copy()
        want[short] = itc[short].sum() * share / share.sum()
        got = np.array([after["probabilities"][c] for c in classes])
        assert np.allclose(got, want, atol=1e-5), path
        assert after["top_label"] == classes[short[int(np.argmax(score))]]
        changed += after["top_label"] != before["top_label"]
    # measured: every image's top class changes (ITC: nominal; the ITM shortlist of 2: global)
    assert changed == len(paths)
    everything = classify(paths, classes, backbone=blip, templates=[template], rerank="itm", rerank_k=3)
    # measured: with all three classes shortlisted, ITM picks 'local', which the shortlist of 2 had left out
    assert any(r["top_label"] not in (plain_row["top_label"], ranked_row["top_label"])
               for r, plain_row, ranked_row in zip(everything.rows, plain.rows, ranked.rows))


def test_reranking_is_refused_in_one_line_without_an_itm_head(monkeypatch, capsys, tmp_path, textile_subset,
                                                               tiny_clip_config):
    from fewvision.cli import main

    def run(*args):
        monkeypatch.setattr("sys.argv", ["fewvision", *map(str, args)])
        with pytest.raises(SystemExit) as done:
            main()
        return done.value.code, capsys.readouterr().err

    code, err = run("classify", textile_subset, "--classes", "a,b", "--backbone", f"openclip:{tiny_clip_config}",
                    "--rerank", "itm")
    assert code == 2 and err.count("\n") == 1 and "--rerank itm needs a backbone with an image-text matching" in err
    code, err = run("classify", textile_subset, "--classes", "a,b", "--rerank", "itc")
    assert code == 2 and err.count("\n") == 1 and "--rerank itc: expected itm" in err
