"""Bottleneck adapters (Houlsby / Pfeiffer) in every block of both towers of the tiny random open_clip CLIP."""

import copy

import numpy as np
import pytest
import torch

from tuning_helpers import learning_rates

from fewvision.backbones.base import BackboneError
from fewvision.deploy.onnx import ExportError, export_onnx
from fewvision.heads import create_head
from fewvision.heads.bottleneck import Bottleneck, add_adapters
from fewvision.heads.tuned import open_clip_blocks
from fewvision.modelfile import FewVisionModel, load, save_model

pytestmark = pytest.mark.usefixtures("one_thread")


def accuracy(head, backbone, images, truth) -> float:
    return float((head.predict_proba_images(backbone, images).argmax(1) == truth).mean())


def _outputs(model, pixels, tokens):
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokens)


def test_at_initialisation_the_adapted_model_is_clip(tiny_clip):
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = tiny_clip.tokenizer(["a photo of a red thing.", "a scratch"])
    frozen = copy.deepcopy(tiny_clip.model).requires_grad_(False)
    # frozen weights let nn.MultiheadAttention take its fused path: equal to the trainable model within 2e-6 only
    base, unchanged = _outputs(frozen, pixels, tokens), _outputs(tiny_clip.model, pixels, tokens)
    for variant in ("houlsby", "pfeiffer"):
        adapted = _outputs(add_adapters(tiny_clip.model, variant), pixels, tokens)
        assert all(torch.equal(a, b) for a, b in zip(adapted, base)), variant
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(adapted, unchanged)), variant


@pytest.mark.parametrize("variant, per_block", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapters_sit_in_every_block_of_both_towers(tiny_clip, variant, per_block):
    """The tiny CLIP has 2 blocks of width 64 per tower: a reduction factor of 16 gives 4 hidden units, so an
    adapter holds 64*4 + 4 + 4*64 + 64 = 580 parameters, and only those train."""
    model = add_adapters(tiny_clip.model, variant)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * per_block * 580
    assert all(".adapter." in n for n in trainable)
    assert sum(n.startswith("visual.") for n in trainable) == sum(not n.startswith("visual.") for n in trainable)
    assert not any(".adapter." in n for n, _ in tiny_clip.model.named_parameters())  # a copy was adapted


def test_an_adapter_is_added_to_the_sublayer_output_before_the_residual(tiny_clip):
    """A block with non-zero adapters computes x1 = x + A1(attn(ln_1 x)), x1 + A2(mlp(ln_2 x1)) (Houlsby)."""
    model = add_adapters(tiny_clip.model, "houlsby")
    block = open_clip_blocks(model, "vision")[0]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        x = torch.randn(2, 5, 64, generator=generator)
        a1, a2 = block.ls_1.adapter, block.ls_2.adapter

        def adapter(a, h):
            return h + a.up(torch.nn.functional.silu(a.down(h)))

        attended = block.attn(*(block.ln_1(x),) * 3, need_weights=False)[0]
        x1 = x + adapter(a1, attended)
        want = x1 + adapter(a2, block.mlp(block.ln_2(x1)))
        assert torch.allclose(block(x), want, atol=1e-6)
        assert not torch.allclose(block(x), x + attended + block.mlp(block.ln_2(x + attended)), atol=1e-3)


def test_a_bottleneck_starts_as_the_identity():
    adapter = Bottleneck(64, 16, "relu")
    h = torch.randn(3, 64)
    assert adapter.down.out_features == 4 and torch.equal(adapter(h), h)
    assert float(adapter.down.weight.detach().std()) == pytest.approx(0.02, rel=0.2)


def test_the_defaults_learn_what_clip_gets_wrong_and_reload_identically(tiny_clip, colour_task, tmp_path):
    """Every default (Houlsby, factor 16, lr 1e-4, 500 steps per shot, warm-up then linear decay), 1 shot of each of
    four colours; the start (0 steps) is CLIP's zero-shot."""
    support, images, truth = colour_task
    start = create_head("bottleneck-adapter", steps=0).fit(support)
    head = create_head("bottleneck-adapter").fit(support)
    before, after = accuracy(start, tiny_clip, images, truth), accuracy(head, tiny_clip, images, truth)
    # Measured on the 60 test images: 0.25 (chance) -> 1.0; support loss 1.36 -> 0.52.
    assert before <= 0.3 and after >= 0.9, (before, after)
    assert len(head.losses_) == 500 and head.losses_[-1] < head.losses_[0] - 0.5
    assert all(float(v.abs().max()) > 0 for k, v in head.tuned_.items() if k.endswith("up.weight"))
    path = save_model(tmp_path / "adapter.fvm", FewVisionModel(head, tiny_clip.spec, tiny_clip.id))
    loaded = load(path).bind(tiny_clip).head
    assert set(loaded.tuned_) == set(head.tuned_)
    assert np.array_equal(loaded.predict_proba_images(tiny_clip, images), head.predict_proba_images(tiny_clip, images))
    with pytest.raises(ExportError, match="'bottleneck-adapter' cannot be exported to ONNX: it adds adapters"):
        export_onnx(path, tmp_path / "adapter.onnx")


def test_pfeiffer_learns_too(tiny_clip, colour_task):
    support, images, truth = colour_task
    head = create_head("bottleneck-adapter", variant="pfeiffer", steps=50, lr=1e-3).fit(support)
    assert head.n_trainable_parameters() == 2 * 2 * 580
    # Measured: 0.25 -> 0.5 (the MLP adapters alone, 50 steps).
    assert accuracy(head, tiny_clip, images, truth) >= 0.4


def test_the_warm_up_rises_then_the_rate_decays_to_zero():
    rates = learning_rates(create_head("bottleneck-adapter", lr=1.0, warmup=0.1), 100)
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0) and max(rates) == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(1 / 90) and all(a >= b for a, b in zip(rates[9:], rates[10:]))


def test_a_resnet_image_tower_is_refused_in_one_line(tiny_resnet_clip):
    resnet = tiny_resnet_clip
    with pytest.raises(BackboneError, match="vision tower need open_clip transformer blocks"):
        add_adapters(resnet.model)
    text_only = add_adapters(resnet.model, encoder="text")
    trainable = [n for n, p in text_only.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 4 and all(n.startswith("transformer.") for n in trainable)
