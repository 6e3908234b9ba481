"""fewvision's ProtoNet and Relation Network next to easyfsl's (1.5.0), on identical features and episodes.

Features: the weight-free ``texture`` backbone on the synthetic textile defects (base: folds, holes, nominal,
scratches; novel: missing_threads, spots, stains; 3-way) and on scikit-learn's digits (base 0-4, novel 5-9; 5-way).
Both libraries get the same L2-normalised features, the same embedding network with the same initial weights
(fewvision's residual MLP, the identity at the start), the same meta-training episodes on the base classes (Adam,
same rate) and the same 600 test episodes on the novel classes. What differs is each library's own method:
easyfsl's PrototypicalNetworks scores by negative Euclidean distance (fewvision: squared, as Snell et al.), its
RelationNetworks uses its default convolutional relation module on 1x1 feature maps (fewvision: a two-layer MLP);
both Relation Networks train with MSE on one-hot targets. Fit time: the meta-training wall time.

Run: .venv/bin/python benchmarks/easyfsl_parity.py (needs easyfsl: it is in the dev extra).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402

SETS = {"textile-defects": (["folds", "holes", "nominal", "scratches"], 3),
        "digits": (["0", "1", "2", "3", "4"], 5)}
SHOT, QUERY, TRAIN_EPISODES, TEST_EPISODES, SEED = 5, 10, 1000, 600, 0
LR = {"protonet": 1e-3, "relationnet": 3e-4}  # fewvision's defaults, for both libraries


def features(name):
    from fewvision.backbones import create_backbone
    from fewvision.io.datasets import load_dataset
    from fewvision.tasks.common import encode

    data = load_dataset(name)
    feats = encode(create_backbone("texture"), data.paths, progress=False)
    label_of = dict(zip(data.paths, data.labels))
    return (F.normalize(feats.tensor.float(), dim=-1), np.array([label_of[p] for p in feats.paths]),
            data.class_names)


def ci(acc):
    acc = np.asarray(acc)
    return acc.mean(), 1.96 * acc.std(ddof=1) / np.sqrt(len(acc))


def train_easyfsl(model, episodes, x, loss_of, lr):
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    start = time.perf_counter()
    for ep in episodes:
        model.process_support_set(x[ep.support], torch.as_tensor(ep.support_labels))
        loss = loss_of(model(x[ep.query]), torch.as_tensor(ep.query_labels), len(ep.classes))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return time.perf_counter() - start


def easyfsl_accuracy(model, episodes, x):
    model.eval()
    out = []
    with torch.no_grad():
        for ep in episodes:
            model.process_support_set(x[ep.support], torch.as_tensor(ep.support_labels))
            out.append(float((model(x[ep.query]).argmax(1).numpy() == ep.query_labels).mean()))
    return out


def control_protonet(x, y, base, way, hidden, train):
    from fewvision.meta.episodes import train_on_episodes
    from fewvision.meta.protonet import ResidualEmbedding, class_means

    torch.manual_seed(SEED)
    net = ResidualEmbedding(x.shape[1], hidden)
    episodes = iter(train)

    class Replay:  # train_on_episodes draws from a sampler; replay the shared episodes instead
        def sample(self):
            return next(episodes)

    def loss(ep):
        protos = class_means(net(x[ep.support]), torch.as_tensor(ep.support_labels), way)
        return F.cross_entropy(-torch.cdist(net(x[ep.query]), protos), torch.as_tensor(ep.query_labels))

    train_on_episodes(Replay(), net.parameters(), loss, len(train), LR["protonet"], 1e-4)
    return net.eval()


def plain_accuracy(x, episodes, net):
    from fewvision.meta.protonet import class_means

    out = []
    with torch.no_grad():
        z = net(x)
        for ep in episodes:
            protos = class_means(z[ep.support], torch.as_tensor(ep.support_labels), len(ep.classes))
            out.append(float((torch.cdist(z[ep.query], protos).argmin(1).numpy() == ep.query_labels).mean()))
    return out


def main() -> None:
    from easyfsl.methods import PrototypicalNetworks, RelationNetworks

    from fewvision.meta import protonet, relationnet
    from fewvision.meta.episodes import EpisodeSampler, split_classes
    from fewvision.meta.protonet import ResidualEmbedding, class_means

    torch.set_num_threads(2)
    rows = []
    for name, (base_names, way) in SETS.items():
        x, y, names = features(name)
        base, novel = split_classes(names, base_names)
        # The very episodes fewvision's meta_train draws (same sampler, same seed), for easyfsl too.
        sampler = EpisodeSampler(y, way, SHOT, QUERY, classes=base, seed=SEED)
        train = [sampler.sample() for _ in range(TRAIN_EPISODES)]
        test_sampler = EpisodeSampler(y, way, SHOT, 15, classes=novel, seed=SEED + 1)
        test = [test_sampler.sample() for _ in range(TEST_EPISODES)]
        hidden = 256

        # --- ProtoNet ---
        start = time.perf_counter()
        ours = protonet.meta_train(x, y, classes=base, way=way, shot=SHOT, query=QUERY, episodes=TRAIN_EPISODES,
                                   hidden=hidden, lr=LR["protonet"], seed=SEED)
        ours_s = time.perf_counter() - start
        ours_acc = protonet.episode_accuracy(x, y, test, ours.embedding)
        torch.manual_seed(SEED)
        theirs = PrototypicalNetworks(ResidualEmbedding(x.shape[1], hidden))
        theirs_s = train_easyfsl(theirs, train, x, lambda s, q, _: F.cross_entropy(s, q), LR["protonet"])
        theirs_acc = easyfsl_accuracy(theirs, test, x)
        untrained = protonet.episode_accuracy(x, y, test)
        rows.append([name, f"{way}-way {SHOT}-shot", "ProtoNet", "%.4f ± %.4f" % ci(ours_acc),
                     "%.4f ± %.4f" % ci(theirs_acc), f"{ours_s:.1f}", f"{theirs_s:.1f}",
                     "%.4f ± %.4f" % ci(untrained)])
        # Control: fewvision's training loop with easyfsl's score (plain, not squared, distances). If it matches
        # easyfsl, the two implementations agree and the gap above is the choice of distance.
        control = control_protonet(x, y, base, way, hidden, train)
        rows.append([name, f"{way}-way {SHOT}-shot", "ProtoNet, unsquared distance (control)",
                     "%.4f ± %.4f" % ci(plain_accuracy(x, test, control)),
                     "%.4f ± %.4f" % ci(theirs_acc), "", "", ""])

        # --- Relation Network ---
        start = time.perf_counter()
        ours_rn = relationnet.meta_train(x, y, classes=base, way=way, shot=SHOT, query=QUERY,
                                         episodes=TRAIN_EPISODES, hidden=hidden, lr=LR["relationnet"], seed=SEED)
        ours_rn_s = time.perf_counter() - start
        acc = []
        with torch.no_grad():
            z = ours_rn.embedding(x)
            for ep in test:
                protos = class_means(z[ep.support], torch.as_tensor(ep.support_labels), way)
                acc.append(float((ours_rn.relation(z[ep.query], protos).argmax(1).numpy() == ep.query_labels).mean()))
        torch.manual_seed(SEED)
        backbone = torch.nn.Sequential(ResidualEmbedding(x.shape[1], hidden), torch.nn.Unflatten(1, (x.shape[1], 1, 1)))
        theirs_rn = RelationNetworks(backbone, feature_dimension=x.shape[1])
        theirs_rn_s = train_easyfsl(theirs_rn, train, x,
                                    lambda s, q, n: F.mse_loss(s, F.one_hot(q, n).float()), LR["relationnet"])
        theirs_rn_acc = easyfsl_accuracy(theirs_rn, test, x)
        rows.append([name, f"{way}-way {SHOT}-shot", "RelationNet", "%.4f ± %.4f" % ci(acc),
                     "%.4f ± %.4f" % ci(theirs_rn_acc), f"{ours_rn_s:.1f}", f"{theirs_rn_s:.1f}", ""])
        print(*rows[-3:], sep="\n", flush=True)

    md = ["## ProtoNet and Relation Network vs easyfsl (`benchmarks/easyfsl_parity.py`)", "",
          f"Identical texture-backbone features, embedding initialisation, {TRAIN_EPISODES} meta-training episodes "
          f"on the base classes (Adam, lr {LR['protonet']} for ProtoNet, {LR['relationnet']} for RelationNet) and "
          f"{TEST_EPISODES} test episodes ({SHOT} support and 15 query images per class) on the novel classes; "
          "accuracy with 95% intervals. fewvision's ProtoNet uses squared Euclidean distances (Snell et al.), "
          "easyfsl's plain ones (the control row trains fewvision's loop with easyfsl's distance); easyfsl's "
          "Relation Network has its convolutional relation module (here on 1x1 maps), fewvision's an MLP with batch "
          "norm. The last column is the untrained embedding (plain prototypes) on the same episodes. Seconds: "
          "meta-training wall time.", "",
          table(["data", "task", "method", "fewvision", "easyfsl", "fewvision s", "easyfsl s",
                 "untrained prototypes"], rows)]
    write_section("easyfsl_parity", "\n".join(md))


if __name__ == "__main__":
    main()
