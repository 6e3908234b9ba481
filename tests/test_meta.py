"""Episodes and ProtoNet meta-training on cached features (issue 14, first part)."""

import numpy as np
import pytest
import torch

from fewvision.meta.episodes import EpisodeSampler, split_classes
from fewvision.meta.protonet import ResidualEmbedding, episode_accuracy, meta_train

pytestmark = pytest.mark.usefixtures("one_thread")


def structured_features(seed=0, n_classes=20, per_class=40):
    """Classes separated in 8 signal dimensions, buried under 56 dimensions of larger noise shared by all classes:
    a metric learned on some classes (down-weight the noise) transfers to the others."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, 8))
    x = np.concatenate([np.concatenate([means[c] + 0.3 * rng.normal(size=(per_class, 8)),
                                        1.5 * rng.normal(size=(per_class, 56))], 1) for c in range(n_classes)])
    return x.astype(np.float32), np.repeat(np.arange(n_classes), per_class)


def test_episodes_are_seeded_disjoint_and_drawn_from_the_given_classes():
    labels = np.repeat(np.arange(8), [20, 20, 20, 20, 20, 20, 20, 3])
    a = [EpisodeSampler(labels, 4, 2, 5, classes=range(6), seed=3).sample() for _ in range(1)]
    sampler = EpisodeSampler(labels, 4, 2, 5, classes=range(6), seed=3)
    eps = [sampler.sample() for _ in range(50)]
    assert np.array_equal(a[0].support, eps[0].support) and np.array_equal(a[0].query, eps[0].query)
    for ep in eps:
        assert len(ep.support) == 8 and len(ep.query) == 20 and len(set(ep.classes)) == 4
        assert not set(ep.support) & set(ep.query)
        assert set(labels[ep.support]) | set(labels[ep.query]) <= set(range(6))
        assert np.array_equal(labels[ep.support], ep.classes[ep.support_labels])
        assert np.array_equal(labels[ep.query], ep.classes[ep.query_labels])
    assert len({tuple(ep.classes) for ep in eps}) > 10  # not one task over and over
    with pytest.raises(ValueError, match="need 4 classes with at least 7 examples each; 3 of the 4 "):
        EpisodeSampler(labels, 4, 2, 5, classes=[0, 1, 7, 6])  # class 7 has 3 examples


def test_base_and_novel_classes_are_split_by_name():
    assert split_classes(["a", "b", "c", "d"], ["b", "d"]) == ([1, 3], [0, 2])
    with pytest.raises(ValueError, match="'x'|x"):
        split_classes(["a", "b"], ["a", "x"])
    with pytest.raises(ValueError, match="at least two base classes"):
        split_classes(["a", "b"], ["a"])


def test_an_untrained_embedding_is_the_plain_prototype_head():
    x, y = structured_features()
    eps = [EpisodeSampler(y, 5, 1, 5, seed=0).sample() for _ in range(20)]
    fresh = ResidualEmbedding(x.shape[1], 32)
    assert np.array_equal(episode_accuracy(x, y, eps, fresh), episode_accuracy(x, y, eps))


@pytest.mark.parametrize("shot", [1, 5])
def test_meta_training_on_base_classes_beats_untrained_prototypes_on_novel_ones(shot):
    x, y = structured_features()
    result = meta_train(x, y, classes=range(10), way=5, shot=shot, query=10, episodes=1000, seed=0)
    assert result.losses[-1] < 0.5 * result.losses[0]
    sampler = EpisodeSampler(y, 5, shot, 15, classes=range(10, 20), seed=1)  # novel classes only
    eps = [sampler.sample() for _ in range(300)]
    untrained, meta = episode_accuracy(x, y, eps), episode_accuracy(x, y, eps, result.embedding)
    # Measured: 1-shot 0.31 -> 0.79, 5-shot 0.46 -> 0.85 (300 episodes); pinned with a wide margin.
    assert meta.mean() > untrained.mean() + 0.2


def test_meta_training_is_deterministic_with_a_seed():
    x, y = structured_features()
    a = meta_train(x, y, classes=range(10), episodes=50, seed=4).embedding.state_dict()
    b = meta_train(x, y, classes=range(10), episodes=50, seed=4).embedding.state_dict()
    c = meta_train(x, y, classes=range(10), episodes=50, seed=5).embedding.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_meta_train_then_fit_meta_keeps_the_embedding_and_learns_the_new_prototypes(monkeypatch, capsys, tmp_path,
                                                                                   textile_subset):
    from cli_helpers import run_cli

    from fewvision.modelfile import load

    meta, model = tmp_path / "meta.fvm", tmp_path / "m.fvm"
    code, out, err = run_cli(monkeypatch, capsys, "meta-train", textile_subset, "--base-classes", "nominal,local",
                             "-b", "texture", "--way", "2", "--shot", "2", "--query", "4", "--episodes", "60",
                             "-o", meta)
    assert code == 0, err
    assert "2 base class(es)" in out
    m = load(meta)
    assert m.info["meta"]["base_classes"] == ["local", "nominal"] and m.info["meta"]["novel_classes"] == ["global"]
    assert m.head.class_names_ == ["local", "nominal"] and m.head.meta_["episodes"] == 60
    code, _, err = run_cli(monkeypatch, capsys, "fit", textile_subset, "--method", "protonet", "--meta", meta,
                           "--shots", "2", "-o", model)
    assert code == 0, err
    fitted = load(model)
    assert fitted.backbone_spec == "texture" and fitted.head.class_names_ == ["global", "local", "nominal"]
    assert torch.equal(fitted.head.outer_weight_, m.head.outer_weight_)  # the embedding came from meta-train
    assert fitted.head.meta_["from"] == "meta-trained" and fitted.head.meta_["base_classes"] == ["local", "nominal"]
    assert float(m.head.outer_weight_.abs().max()) > 0  # it was trained (the identity starts at zero)
    code, _, err = run_cli(monkeypatch, capsys, "predict", model, textile_subset, "-o", tmp_path / "r.csv")
    assert code == 0, err
    for args, message in ((["--method", "prototype"], "a protonet model"),
                          (["--method", "protonet", "-b", "timm:resnet18@random"], "meta-trained on backbone")):
        code, _, err = run_cli(monkeypatch, capsys, "fit", textile_subset, *args, "--meta", meta, "-o", model)
        assert code == 2 and message in err, err
    code, _, err = run_cli(monkeypatch, capsys, "meta-train", textile_subset, "--base-classes", "nominal,holes",
                           "-b", "texture", "-o", meta)
    assert code == 2 and "holes" in err


def test_protonet_without_meta_training_fits_from_one_image_per_class():
    from fewvision.heads import create_head
    from fewvision.heads.support import Support

    x, y = structured_features()
    one = np.array([np.flatnonzero(y == c)[0] for c in range(5)])
    head = create_head("protonet", episodes=10).fit(Support(x[one], np.arange(5), list("abcde")))
    assert "identity" in head.meta_["trained_on"]
    proba = head.predict_proba(torch.as_tensor(x[y < 5]))
    assert proba.shape == (200, 5) and np.allclose(proba.sum(1), 1, atol=1e-5)
    three = np.concatenate([np.flatnonzero(y == c)[:3] for c in range(5)])
    trained = create_head("protonet", episodes=30).fit(Support(x[three], np.repeat(np.arange(5), 3), list("abcde")))
    assert trained.meta_["trained_on"] == "episodes of the support set itself" and trained.meta_["shot"] == 2


def test_relationnet_meta_trained_on_base_classes_beats_untrained_prototypes_on_novel_ones():
    from fewvision.heads import create_head
    from fewvision.heads.support import Support

    x, y = structured_features()
    meta = create_head("relationnet", shot=1, query=10, episodes=1000).meta_fit(x[y < 10], y[y < 10])
    assert meta.meta_["losses"][-1] < 0.6 * meta.meta_["losses"][0]
    sampler = EpisodeSampler(y, 5, 1, 15, classes=range(10, 20), seed=1)
    eps = [sampler.sample() for _ in range(200)]
    accuracy = []
    for ep in eps:
        head = create_head("relationnet").adopt(meta, {}).fit(Support(x[ep.support], ep.support_labels, list("abcde")))
        accuracy.append((head.predict(x[ep.query]) == ep.query_labels).mean())
    # Measured: 0.30 -> 0.80 (1-shot, 200 episodes; 0.59 before the relation module had batch norm).
    assert np.mean(accuracy) > episode_accuracy(x, y, eps).mean() + 0.25
    a, b = (create_head("relationnet", shot=1, query=10, episodes=30).meta_fit(x[y < 10], y[y < 10]) for _ in "ab")
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in a.NETWORK)  # seeded (few episodes: determinism)


def test_relationnet_clips_the_gradient_norm_as_the_official_code():
    from fewvision.meta import relationnet

    x, y = structured_features()
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        original(parameters, max_norm, *args, **kwargs)
        seen.append((max_norm, float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])))))

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        relationnet.meta_train(x, y, classes=range(10), shot=1, query=5, episodes=5, lr=1.0, validation_classes=0)
    finally:
        torch.nn.utils.clip_grad_norm_ = original
    assert len(seen) == 5 and all(m == 0.5 and norm <= 0.5 + 1e-5 for m, norm in seen)


def test_early_stopping_on_held_out_base_classes_keeps_the_start_when_training_does_not_help():
    from fewvision.meta.episodes import validation_note

    from fewvision.meta.episodes import validation_split

    x, y = structured_features()
    x, y = x[y < 10], y[y < 10]
    train, held = validation_split(range(10), None, 0)
    # The training classes' labels shuffled among their images: what the embedding learns from them is noise, and
    # it hurts the held-out classes (measured: validation accuracy 0.79 at the start, 0.62 / 0.60 after 100 / 200).
    noisy = y.copy()
    among = np.flatnonzero(np.isin(y, train))
    noisy[among] = np.random.default_rng(0).permutation(y[among])
    wrecked = meta_train(x, noisy, classes=range(10), episodes=200, validation_episodes=50, seed=0)
    v = wrecked.validation
    assert wrecked.validation_classes == held and len(held) == 2 and v["kept_episode"] == 0
    assert len(v["curve"]) == 3 and all(acc < v["start_accuracy"] for episode, acc in v["curve"] if episode > 0)
    state = wrecked.embedding.state_dict()  # the identity start: the residual branch's output layer still zero
    assert not state["outer.weight"].any() and not state["outer.bias"].any()
    assert "did not beat its start" in validation_note({"validation": v, "episodes": 200})
    helped = meta_train(x, y, classes=range(10), episodes=200, validation_episodes=50, seed=0)
    v = helped.validation
    assert v["kept_episode"] > 0 and v["kept_accuracy"] > v["start_accuracy"] + 0.1  # measured 0.79 -> 0.97
    assert "meta-training beat its start" in validation_note({"validation": v, "episodes": 200})
    none = meta_train(x, y, classes=range(10), episodes=20, validation_classes=0, seed=0)
    assert none.validation is None and none.validation_classes == []


def test_relationnet_with_one_image_per_class_and_no_meta_says_what_it_needs():
    from fewvision.heads import create_head
    from fewvision.heads.support import Support

    x, y = structured_features()
    one = np.array([np.flatnonzero(y == c)[0] for c in range(3)])
    with pytest.raises(ValueError, match="give --meta"):
        create_head("relationnet").fit(Support(x[one], np.arange(3), list("abc")))


def test_meta_train_defaults_fit_a_small_dataset(monkeypatch, capsys, tmp_path, textile_subset):
    from cli_helpers import run_cli

    from fewvision.modelfile import load

    code, _, err = run_cli(monkeypatch, capsys, "meta-train", textile_subset, "-b", "texture", "--episodes", "20",
                           "-o", tmp_path / "m.fvm")
    assert code == 0, err
    meta = load(tmp_path / "m.fvm").head.meta_
    assert (meta["way"], meta["shot"], meta["query"]) == (3, 5, 7)  # 3 classes of 12 images


def test_maml_inner_loop_lowers_the_support_loss_and_second_order_differs_from_first():
    from fewvision.meta import maml

    x, y = structured_features()
    xs = torch.nn.functional.normalize(torch.as_tensor(x[:100:4]), dim=-1)  # 25 images of 3 classes
    ys = torch.as_tensor(y[:100:4])
    torch.manual_seed(0)
    theta = {k: v + 0.05 * torch.randn_like(v) for k, v in maml.initial_parameters(64, 16).items()}
    start = maml.classifier(theta, 3)
    before = float(maml.support_loss(start, {}, xs, ys))
    for variant in maml.VARIANTS:
        fast = maml.adapt(start, xs, ys, steps=5, lr=0.5, variant=variant)
        after = float(maml.support_loss(fast, {}, xs, ys))
        assert after < before - 0.05, (variant, before, after)
        if variant == "anil":  # the body stays where it started
            assert all(torch.equal(fast[k], start[k]) for k in maml.BODY)
    # The outer gradient, against a reference written with plain autograd: second order differentiates through
    # the inner steps (create_graph), first order treats the inner gradients as constants.
    def reference(first_order):
        th = {k: v.clone().requires_grad_() for k, v in theta.items()}
        fast = maml.classifier(th, 3)
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(maml.forward(fast, xs), ys)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - 0.5 * g for (k, v), g in zip(fast.items(), grads)}
        torch.nn.functional.cross_entropy(maml.forward(fast, xs), ys).backward()
        return th["inner.weight"].grad

    outer = {}
    for variant in ("maml", "fomaml"):
        th = {k: v.clone().requires_grad_() for k, v in theta.items()}
        fast = maml.adapt(maml.classifier(th, 3), xs, ys, steps=2, lr=0.5, variant=variant)
        torch.nn.functional.cross_entropy(maml.forward(fast, xs), ys).backward()
        outer[variant] = th["inner.weight"].grad
    assert torch.allclose(outer["maml"], reference(first_order=False), rtol=1e-4, atol=1e-7)
    assert torch.allclose(outer["fomaml"], reference(first_order=True), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(outer["maml"], outer["fomaml"], rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="unknown MAML variant 'reptile'"):
        maml.adapt(start, xs, ys, steps=1, lr=0.5, variant="reptile")


@pytest.mark.parametrize("variant", ["maml", "fomaml", "anil"])
def test_maml_meta_training_beats_its_untrained_start_on_novel_classes(variant):
    from fewvision.meta import maml

    x, y = structured_features()
    result = maml.meta_train(x, y, classes=range(10), variant=variant, shot=1, query=10, episodes=500, hidden=64,
                               validation_classes=0)
    sampler = EpisodeSampler(y, 5, 1, 15, classes=range(10, 20), seed=1)
    eps = [sampler.sample() for _ in range(200)]
    untrained = maml.episode_accuracy(x, y, eps, maml.initial_parameters(64, 64), steps=5, lr=0.5)
    meta = maml.episode_accuracy(x, y, eps, result.theta, steps=5, lr=0.5, variant=variant)
    # Measured 1-shot (200 novel episodes): untrained 0.30; maml 0.74, fomaml 0.67, anil 0.73.
    assert meta.mean() > untrained.mean() + 0.2


def test_maml_head_meta_train_fit_save_and_predict(tmp_path):
    from fewvision.heads import create_head
    from fewvision.heads.support import Support
    from fewvision.modelfile import FewVisionModel, load, save_model

    x, y = structured_features()
    base = y < 10
    meta = create_head("maml", variant="anil", shot=1, query=10, episodes=500, hidden=32, seed=3,
                       validation_classes=0)
    meta.meta_fit(torch.as_tensor(x[base]), y[base])
    one = np.array([np.flatnonzero(y == c)[0] for c in range(10, 16)])  # one image of each of 6 novel classes
    head = create_head("maml").adopt(meta, {"from": "meta-trained"}).fit(
        Support(torch.as_tensor(x[one]), np.arange(6), list("abcdef")))
    assert head.variant == "anil" and head.head_weight_.shape == (6, 64)  # any number of classes, not only `way`
    assert torch.equal(head.row_weight_, meta.row_weight_)
    untrained = create_head("maml").fit(Support(torch.as_tensor(x[one]), np.arange(6), list("abcdef")))
    assert "untrained" in untrained.meta_["trained_on"]
    novel = (y >= 10) & (y < 16)
    accuracy = {name: float((h.predict(torch.as_tensor(x[novel])) == y[novel] - 10).mean())
                for name, h in (("meta", head), ("untrained", untrained))}
    assert accuracy["meta"] > accuracy["untrained"] + 0.2, accuracy  # measured 0.66 vs 0.27 (6-way 1-shot)
    path = tmp_path / "m.fvm"
    save_model(path, FewVisionModel(head, "texture", "texture"))
    again = load(path).head
    assert np.array_equal(again.predict_proba(torch.as_tensor(x[:30])), head.predict_proba(torch.as_tensor(x[:30])))
