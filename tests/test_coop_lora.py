
import numpy as np
import pytest
import torch
from model_checks import tensor_layouts
from PIL import Image

from fewvision.backbones.base import BackboneError
from fewvision.features.encode import encode_files
from fewvision.heads import ZeroShotHead, create_head
from fewvision.heads.coop import CoOpHead, encode_text_embeddings
from fewvision.heads.lora import LoRAHead, split_attention_model
from fewvision.heads.support import Support
from fewvision.modelfile import FewVisionModel, load, save_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def support(tiny_clip, textile_split):
    names, paths, labels, _ = textile_split
    return Support.from_files(tiny_clip, paths, labels, names)


@pytest.fixture(scope="module")
def test_features(tiny_clip, textile_split):
    return encode_files(tiny_clip, textile_split[3], progress=False).tensor


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot):
    state = model.state_dict()
    return set(state) == set(snapshot) and all(torch.equal(state[k], snapshot[k]) for k in snapshot)


# --- CoOp ---------------------------------------------------------------------------------------------------------
def test_text_encoder_on_embeddings_matches_open_clip(tiny_clip):
    model = tiny_clip.model
    tokens = tiny_clip.tokenizer(["a photo of a scratch.", "a close-up photo of a stain on woven fabric."])
    with torch.no_grad():
        ours = encode_text_embeddings(model, model.token_embedding(tokens), tokens)
        ref = model.encode_text(tokens)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_coop_photo_context_without_training_is_zero_shot(support, test_features):
    head = CoOpHead(ctx_init="a photo of a", steps=0).fit(support)
    zero_shot = ZeroShotHead(templates=["a photo of a {}."]).fit(support)
    assert head.ctx_.shape == (4, 64)  # n_ctx follows the initialisation's four tokens
    torch.testing.assert_close(head.text_weights_, zero_shot.weights_, atol=1e-5, rtol=1e-5)
    expected = zero_shot.predict_proba(test_features)
    assert expected.std() > 1e-3
    np.testing.assert_allclose(head.predict_proba(test_features), expected, atol=1e-5)


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_trains_only_the_context(tiny_clip, support, test_features, class_specific):
    snapshot = _snapshot(tiny_clip.model)
    requires = [p.requires_grad for p in tiny_clip.model.parameters()]
    head = create_head("coop", n_ctx=4, class_specific=class_specific, steps=15).fit(support)
    untrained = CoOpHead(n_ctx=4, class_specific=class_specific, steps=0).fit(support)
    assert _unchanged(tiny_clip.model, snapshot)
    assert [p.requires_grad for p in tiny_clip.model.parameters()] == requires
    assert head.ctx_.shape == ((3, 4, 64) if class_specific else (4, 64))
    assert head.n_trainable_parameters() == head.ctx_.numel()
    assert not torch.equal(head.ctx_, untrained.ctx_)  # same seed, same start: training moved the context
    assert head.losses_[-1] < head.losses_[0]
    assert np.abs(head.predict_proba(test_features) - untrained.predict_proba(test_features)).max() > 1e-3


def test_coop_save_load(tiny_clip, support, test_features, tmp_path):
    head = CoOpHead(n_ctx=4, steps=3).fit(support)
    path = save_model(tmp_path / "coop.fvm", FewVisionModel(head, tiny_clip.spec, tiny_clip.id))
    loaded = load(path).head
    torch.testing.assert_close(loaded.ctx_, head.ctx_, atol=0, rtol=0)
    np.testing.assert_array_equal(loaded.predict_proba(test_features), head.predict_proba(test_features))
    assert tensor_layouts(loaded) == tensor_layouts(head)


# --- LoRA ---------------------------------------------------------------------------------------------------------
def _outputs(model, pixels, tokens):
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokens)


def test_lora_at_initialisation_is_the_base_model(tiny_clip):
    pixels = torch.randn(2, 3, 64, 64)
    tokens = tiny_clip.tokenizer(["a photo of a scratch.", "a photo of a dent."])
    adapted = LoRAHead()._adapted_model(tiny_clip)
    split, names = split_attention_model(tiny_clip.model)
    assert len(names) == 2 * 2 * 3  # both towers x 2 blocks x q, k, v
    assert sum("lora_B" in n for n, _ in adapted.named_parameters()) == len(names)
    for ours, theirs, base in zip(_outputs(adapted, pixels, tokens), _outputs(split, pixels, tokens),
                                  _outputs(tiny_clip.model, pixels, tokens)):
        assert torch.equal(ours, theirs)  # B = 0: LoRA adds exactly nothing
        torch.testing.assert_close(theirs, base, atol=1e-5, rtol=1e-5)  # split attention = nn.MultiheadAttention


def test_lora_fit_changes_only_lora_and_reloads_identically(tiny_clip, support, textile_split, tmp_path):
    snapshot = _snapshot(tiny_clip.model)
    head = LoRAHead(steps=4, batch_size=8, lr=1e-2, seed=1).fit(support)
    assert _unchanged(tiny_clip.model, snapshot)
    assert len(head.losses_) == 4
    assert head.n_trainable_parameters() == sum(v.numel() for k, v in head.tuned_.items())
    assert any(float(v.abs().max()) > 0 for k, v in head.tuned_.items() if "lora_B" in k)
    split, _ = split_attention_model(tiny_clip.model)
    base = split.state_dict()
    for name, value in head._model.state_dict().items():
        if "lora_" in name:
            continue
        assert torch.equal(value, base[name.replace(".base_layer", "")]), name

    images = [Image.open(p) for p in textile_split[3]]
    proba = head.predict_proba_images(tiny_clip, images)
    fresh = LoRAHead(steps=0).fit(support).predict_proba_images(tiny_clip, images)
    assert np.abs(proba - fresh).max() > 1e-4  # the adapted towers do predict differently
    path = save_model(tmp_path / "lora.fvm", FewVisionModel(head, tiny_clip.spec, tiny_clip.id))
    loaded = load(path).head
    assert set(loaded.tuned_) == set(head.tuned_)
    with pytest.raises(ValueError, match="bind"):
        loaded.predict_proba(torch.stack([tiny_clip.preprocess(im.convert("RGB")) for im in images]))
    np.testing.assert_array_equal(loaded.predict_proba_images(tiny_clip, images), proba)


def test_lora_needs_a_transformer_image_tower(tiny_resnet_clip):
    resnet = tiny_resnet_clip
    with pytest.raises(BackboneError, match="ModifiedResNet"):
        LoRAHead()._adapted_model(resnet)
    text_only = LoRAHead(encoder="text")._adapted_model(resnet)
    assert all(n.startswith("transformer.") for n, p in text_only.named_parameters() if p.requires_grad)
