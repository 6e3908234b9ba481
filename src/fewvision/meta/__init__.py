"""Meta-learning on cached features: episodes drawn from a site's base classes train a head how to learn from a
few images of new (novel) classes. :mod:`.episodes` samples the tasks; :mod:`.protonet` trains ProtoNet's
embedding (Snell et al. 2017)."""
