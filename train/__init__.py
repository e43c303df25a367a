"""Everything that touches a model, in folders by role: config, model, data, checkpoints,
distributed, loop, evals, and the verbs that compose them (see ../README.md, Layout)."""

__version__ = "0.1.0"
