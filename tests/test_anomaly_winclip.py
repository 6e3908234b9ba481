"""WinCLIP / WinCLIP+ on tiny random open_clip ViTs (6x6 patch grid, so 2x2 and 3x3 windows both fit)."""

import json

import pytest
import torch
import torch.nn.functional as F
from model_checks import tensor_layouts

from fewvision.anomaly import anomaly_head_classes, create_anomaly_head
from fewvision.anomaly.winclip import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES,
    WinClipHead,
    compositional_prompts,
    harmonic_aggregation,
    window_embeddings,
    window_indices,
)
from fewvision.backbones import create_backbone
from fewvision.backbones.base import BackboneError

TINY_CLIP_96 = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 96, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def clip96(tmp_path_factory):
    path = tmp_path_factory.mktemp("winclip-config") / "tiny-clip-96.json"
    path.write_text(json.dumps(TINY_CLIP_96))
    return create_backbone(f"openclip:{path}")


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(5, 3, 96, 96, generator=gen)


@pytest.fixture(scope="module")
def zero_shot(clip96, images):
    return WinClipHead(object_name="fabric", shots=0).fit(images, clip96)


@pytest.fixture(scope="module")
def few_shot(clip96, images):
    return WinClipHead(object_name="fabric", shots=2, seed=1).fit(images[:3], clip96)


def test_registered_as_backbone_head():
    assert anomaly_head_classes()["winclip"] is WinClipHead
    head = create_anomaly_head("winclip", object_name="bottle")
    assert head.inputs == "backbone" and head.object_name == "bottle"


def test_prompt_ensemble_is_states_times_templates():
    prompts = compositional_prompts("fabric", NORMAL_STATES, TEMPLATES)
    assert len(prompts) == len(NORMAL_STATES) * len(TEMPLATES)
    assert "a cropped photo of the flawless fabric." in prompts
    assert "a photo of a fabric with defect for visual inspection." in compositional_prompts(
        "fabric", ANOMALOUS_STATES, TEMPLATES
    )


def test_window_indices_on_a_3x3_grid():
    idx = window_indices((3, 3), 2)
    assert idx.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert window_indices((6, 6), 3).shape == (16, 9)
    with pytest.raises(ValueError):
        window_indices((4, 4), 5)


def test_harmonic_aggregation_matches_the_formula():
    s = torch.tensor([[0.2, 0.4, 0.5, 0.8]])  # the four 2x2 windows of a 3x3 grid
    m = harmonic_aggregation(s, window_indices((3, 3), 2), (3, 3))[0]
    assert m.shape == (3, 3)
    assert m[0, 0].item() == pytest.approx(0.2)  # corners: one window each
    assert m[2, 2].item() == pytest.approx(0.8)
    assert m[0, 1].item() == pytest.approx(2 / (1 / 0.2 + 1 / 0.4))  # edges: two windows
    assert m[1, 2].item() == pytest.approx(2 / (1 / 0.4 + 1 / 0.8))
    assert m[1, 1].item() == pytest.approx(4 / (1 / 0.2 + 1 / 0.4 + 1 / 0.5 + 1 / 0.8))  # centre: all four


def test_full_window_embedding_equals_the_image_embedding(clip96, images, tiny_clip):
    with torch.inference_mode():
        ordinary = clip96.model.encode_image(images)
    full = window_embeddings(clip96, images, 6)
    assert full.shape == (5, 1, 32)
    torch.testing.assert_close(full[:, 0], ordinary.float(), atol=1e-5, rtol=1e-5)
    # Same on the 4x4 grid of the shared tiny CLIP.
    x = images[:2, :, :64, :64]
    with torch.inference_mode():
        torch.testing.assert_close(window_embeddings(tiny_clip, x, 4)[:, 0], tiny_clip.model.encode_image(x).float(),
                                   atol=1e-5, rtol=1e-5)
    # A smaller window is not the image embedding.
    assert (window_embeddings(clip96, images, 2)[:, 0] - ordinary).abs().max() > 1e-3


def test_window_embedding_ignores_pixels_outside_the_window(clip96, images):
    changed = images.clone()
    changed[:, :, 64:, 64:] += 5.0  # patches (4..5, 4..5): outside the top-left 2x2 window
    before, after = window_embeddings(clip96, images, 2), window_embeddings(clip96, changed, 2)
    assert before.shape == (5, 25, 32)
    torch.testing.assert_close(after[:, 0], before[:, 0], atol=1e-6, rtol=1e-6)  # window (0, 0) is masked from it
    assert (after[:, -1] - before[:, -1]).abs().max() > 1e-3  # window (4, 4) contains the change


def test_zero_shot_shapes_and_image_level_score(zero_shot, clip96, images):
    maps, scores = zero_shot.score(images, clip96)
    assert maps.shape == (5, 6, 6) and scores.shape == (5,)
    assert torch.all((maps > 0) & (maps < 1)) and torch.all((scores > 0) & (scores < 1))
    assert zero_shot.n_shots_ == 0 and not hasattr(zero_shot, "patch_memory_")
    # The image-level score recomputed from the public encoders: softmax(logit_scale * cos) of the anomalous state.
    g_n = F.normalize(clip96.encode_text(compositional_prompts("fabric", NORMAL_STATES, TEMPLATES)).mean(0), dim=0)
    g_a = F.normalize(clip96.encode_text(compositional_prompts("fabric", ANOMALOUS_STATES, TEMPLATES)).mean(0), dim=0)
    f = clip96.encode_images(images)
    expected = torch.softmax(clip96.logit_scale * f @ torch.stack([g_n, g_a]).T, dim=-1)[:, 1]
    paper = WinClipHead(object_name="fabric", shots=0, score_rule="paper").fit(None, clip96)
    torch.testing.assert_close(paper.score(images, clip96)[1], expected, atol=1e-5, rtol=1e-5)
    # The combined rule adds the maximum of the map.
    torch.testing.assert_close(scores, (expected + maps.amax(dim=(1, 2))) / 2, atol=1e-5, rtol=1e-5)


def test_zero_shot_map_is_harmonic_over_windows_and_scales(zero_shot, clip96, images):
    maps, _ = zero_shot.score(images[:2], clip96)
    per_scale = []
    f = clip96.encode_images(images[:2])
    per_scale.append(zero_shot._ascore(f).view(-1, 1, 1).expand(-1, 6, 6))
    for s in (2, 3):
        p = zero_shot._ascore(window_embeddings(clip96, images[:2], s))
        per_scale.append(harmonic_aggregation(p, window_indices((6, 6), s), (6, 6)))
    expected = 3 / sum(1 / m for m in per_scale)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)


def test_few_shot_reference_scored_against_itself_is_near_zero(few_shot, clip96, images):
    assert few_shot.n_shots_ == 2
    assert few_shot.patch_memory_.shape == (2 * 36, 64)
    assert few_shot.window_memory_.shape == (2 * (25 + 16), 32)
    _, _, tokens, windows = few_shot._encode(clip96, images[:3])
    few = few_shot.few_shot_maps(tokens, windows)
    chosen = torch.randperm(3, generator=torch.Generator().manual_seed(1))[:2].sort().values.tolist()
    other = ({0, 1, 2} - set(chosen)).pop()
    assert few[chosen].amax() < 1e-4  # its own patches and windows are in the memory
    assert few[other].amax() > 1e-2
    maps, scores = few_shot.score(images, clip96)
    assert maps.shape == (5, 6, 6) and scores.shape == (5,)


def test_winclip_plus_averages_the_zero_and_few_shot_maps_and_both_score_rules(few_shot, clip96, images):
    maps, combined = few_shot.score(images, clip96)
    paper = WinClipHead(object_name="fabric", shots=2, seed=1, score_rule="paper").fit(images[:3], clip96)
    paper_maps, paper_scores = paper.score(images, clip96)
    assert torch.equal(paper_maps, maps)  # the rule changes the image score only
    # The pieces from the public parts of the head: the zero-shot map of a head without references (same text and
    # scales), the few-shot distance map, and the image-level text score recomputed from the encoders.
    zero_maps, _ = WinClipHead(object_name="fabric", shots=0).fit(None, clip96).score(images, clip96)
    _, _, tokens, windows = few_shot._encode(clip96, images)
    few = few_shot.few_shot_maps(tokens, windows)
    torch.testing.assert_close(maps, (zero_maps + few) / 2, atol=1e-6, rtol=1e-5)
    g_n = F.normalize(clip96.encode_text(compositional_prompts("fabric", NORMAL_STATES, TEMPLATES)).mean(0), dim=0)
    g_a = F.normalize(clip96.encode_text(compositional_prompts("fabric", ANOMALOUS_STATES, TEMPLATES)).mean(0), dim=0)
    image_level = torch.softmax(clip96.logit_scale * clip96.encode_images(images) @ torch.stack([g_n, g_a]).T, -1)[:, 1]
    torch.testing.assert_close(combined, (image_level + maps.amax(dim=(1, 2))) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paper_scores, (image_level + few.amax(dim=(1, 2))) / 2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(paper_scores, combined)


def test_scores_are_deterministic(clip96, images, few_shot):
    again = WinClipHead(object_name="fabric", shots=2, seed=1).fit(images[:3], clip96)
    a, b = few_shot.score(images, clip96), again.score(images, clip96)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_save_and_load_give_identical_scores(tmp_path, few_shot, zero_shot, clip96, images):
    from fewvision.modelfile import FewVisionModel, load, save_model

    for head in (few_shot, zero_shot):
        path = save_model(tmp_path / f"{head.n_shots_}.fvm",
                          FewVisionModel(head, clip96.spec, clip96.id, task="anomaly"))
        loaded = load(path).head
        assert isinstance(loaded, WinClipHead) and loaded.n_shots_ == head.n_shots_
        a, b = head.score(images, clip96), loaded.score(images, clip96)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert tensor_layouts(loaded) == tensor_layouts(head)


def test_needs_a_clip_vit(images):
    cnn = create_backbone("timm:resnet18@random")
    with pytest.raises(BackboneError, match="ViT"):
        WinClipHead(shots=0).fit(images, cnn)


def test_rejects_windows_larger_than_the_grid(tiny_clip):
    with pytest.raises(ValueError, match="does not fit"):
        WinClipHead(shots=0, scales=(2, 5)).fit(None, tiny_clip)
