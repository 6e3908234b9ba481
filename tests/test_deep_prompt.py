"""Deep prompt tuning (text deep prompts; VPT-deep / MaPLe image prompts) on the tiny random open_clip CLIP."""

import copy

import numpy as np
import pytest
import torch

from tuning_helpers import learning_rates

from fewvision.backbones.base import BackboneError
from fewvision.deploy.onnx import ExportError, export_onnx
from fewvision.heads import create_head
from fewvision.heads.deep_prompt import add_deep_prompts
from fewvision.modelfile import FewVisionModel, load, save_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a red.", "a photo of a blue thing.", "a photo of a scratch."]


def accuracy(head, backbone, images, truth) -> float:
    return float((head.predict_proba_images(backbone, images).argmax(1) == truth).mean())


def _words(backbone, n=2):
    """The token embeddings of the first n words of the prompts ('a photo')."""
    with torch.no_grad():
        return backbone.model.token_embedding(backbone.tokenizer(PROMPTS[:1]))[0, 1:1 + n].clone()


def test_layer_0_prompts_start_as_the_words_they_replace(tiny_clip):
    tokens = tiny_clip.tokenizer(PROMPTS)
    frozen = copy.deepcopy(tiny_clip.model).requires_grad_(False)  # the fused attention path, as the copy takes
    prompted = add_deep_prompts(tiny_clip.model, _words(tiny_clip), depth=1)
    with torch.no_grad():
        assert torch.equal(prompted.encode_text(tokens), frozen.encode_text(tokens))
        twin = copy.deepcopy(prompted)  # its blocks read its own copy of the prompts
        prompted.deep_prompts.text[0].add_(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)))
        assert not torch.allclose(prompted.encode_text(tokens), frozen.encode_text(tokens), atol=1e-3)
        assert torch.equal(twin.encode_text(tokens), frozen.encode_text(tokens))
    assert [n for n, p in prompted.named_parameters() if p.requires_grad] == ["deep_prompts.text.0"]


def _text_by_hand(model, prompts, tokens):
    """encode_text with the prompt positions 1..n overwritten before every block: layer 0 by the prompt plus its
    positions' embeddings, deeper layers by the prompt itself."""
    n = prompts[0].shape[0]
    x = model.token_embedding(tokens) + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if i < len(prompts):
            p = prompts[i] + (model.positional_embedding[1:1 + n] if i == 0 else 0)
            x = torch.cat([x[:, :1], p.expand(len(x), -1, -1), x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ model.text_projection


def _image_by_hand(model, prompts, pixels):
    """encode_image with image prompts appended before the pre-norm, the last n tokens overwritten before every
    deeper block, pooled by the class token."""
    v, n = model.visual, prompts[0].shape[0]
    x = v.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(torch.cat([x, prompts[0].expand(len(x), -1, -1)], dim=1))
    for i, block in enumerate(v.transformer.resblocks):
        if 0 < i < len(prompts):
            x = torch.cat([x[:, :-n], prompts[i].expand(len(x), -1, -1)], dim=1)
        x = block(x)
    return v.ln_post(x[:, 0]) @ v.proj


@pytest.mark.parametrize("vision, depth", [("vpt", 9), ("maple", 9), ("vpt", 1)])
def test_the_towers_compute_the_prompted_equations(tiny_clip, vision, depth):
    """Random prompts at both layers (depth 9, capped) or the first (depth 1: the image prompts then reach the
    output through the pre-norm) of both towers: encode_text / encode_image equal a hand-written forward of the
    frozen model; with MaPLe each image prompt is that layer's text prompt through its own linear map."""
    frozen = copy.deepcopy(tiny_clip.model).requires_grad_(False)
    prompted = add_deep_prompts(tiny_clip.model, _words(tiny_clip), depth=depth, vision=vision)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in prompted.deep_prompts.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
        deep = prompted.deep_prompts
        text = [t.detach() for t in deep.text]
        assert len(text) == min(depth, 2)  # capped at the tiny towers' two blocks
        if vision == "vpt":
            image = [t.detach() for t in deep.vision]
        else:
            image = [t @ c.weight.T + c.bias for t, c in zip(text, deep.couple)]
        tokens = tiny_clip.tokenizer(PROMPTS)
        pixels = torch.randn(2, 3, 64, 64, generator=generator)
        assert torch.allclose(prompted.encode_text(tokens), _text_by_hand(frozen, text, tokens), atol=1e-5)
        assert torch.allclose(prompted.encode_image(pixels), _image_by_hand(frozen, image, pixels), atol=1e-5)
        assert not torch.allclose(prompted.encode_image(pixels), frozen.encode_image(pixels), atol=1e-3)


def test_the_defaults_train_only_the_prompts_and_beat_the_start(tiny_clip, colour_task, tmp_path):
    """Every default (2 tokens, depth 9, text only, SGD lr 0.0035, 5 epochs of batches of 4, one warm-up epoch at
    1e-5 then cosine), 1 shot of four colours; then image prompts too (VPT-deep, MaPLe) with 50 epochs."""
    support, images, truth = colour_task
    start = create_head("deep-prompt", steps=0).fit(support)
    head = create_head("deep-prompt").fit(support)
    assert len(head.losses_) == 5  # 5 epochs of the 4 support images in batches of 4
    assert sorted(head.tuned_) == ["deep_prompts.text.0", "deep_prompts.text.1"]
    assert all(not torch.equal(head.tuned_[k], start.tuned_[k]) for k in head.tuned_)
    before, after = accuracy(start, tiny_clip, images, truth), accuracy(head, tiny_clip, images, truth)
    # Measured on the 60 test images: 0.25 (chance) -> 0.47 with the defaults; 1.0 with 50 epochs (any vision).
    assert before <= 0.3 and after >= 0.4, (before, after)
    for vision in ("vpt", "maple"):
        longer = create_head("deep-prompt", vision=vision, epochs=50).fit(support)
        assert accuracy(longer, tiny_clip, images, truth) >= 0.9, vision
    path = save_model(tmp_path / "prompt.fvm", FewVisionModel(longer, tiny_clip.spec, tiny_clip.id))
    loaded = load(path).bind(tiny_clip).head
    assert set(loaded.tuned_) == set(longer.tuned_) and any("couple" in k for k in loaded.tuned_)
    assert np.array_equal(loaded.predict_proba_images(tiny_clip, images),
                          longer.predict_proba_images(tiny_clip, images))
    with pytest.raises(ExportError, match="'deep-prompt' cannot be exported to ONNX"):
        export_onnx(path, tmp_path / "prompt.onnx")


def test_the_schedule_warms_up_one_epoch_then_follows_a_cosine():
    rates = learning_rates(create_head("deep-prompt", epochs=5), 50)
    assert rates[:10] == pytest.approx([1e-5] * 10) and rates[10] == pytest.approx(0.0035)
    assert rates[30] == pytest.approx(0.0035 * 0.5 * (1 + np.cos(np.pi * 20 / 40)))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_a_template_too_short_for_the_tokens_and_a_resnet_image_tower_are_refused(colour_task, tiny_resnet_clip):
    support, _, _ = colour_task
    with pytest.raises(ValueError, match="the template '{} part' has 0 before the class name"):
        create_head("deep-prompt", templates=["{} part"], steps=1).fit(support)
    resnet = tiny_resnet_clip
    with pytest.raises(BackboneError, match="image prompts need an open_clip ViT image tower"):
        add_deep_prompts(resnet.model, _words(resnet), vision="vpt")
    text_only = add_deep_prompts(resnet.model, _words(resnet))
    assert [n for n, p in text_only.named_parameters() if p.requires_grad] == ["deep_prompts.text.0",
                                                                                "deep_prompts.text.1"]
