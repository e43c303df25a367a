"""Everything that touches a model: config, model, attention, engine, verbs."""

__version__ = "0.1.0"
