"""The checks every schema uses, and the freezing of a resolved config. torch-free."""

from __future__ import annotations

import dataclasses

from train.errors import ConfigError


class Schema:
    """Base of every config dataclass. Hydra fills it and `resolve` completes it; `frozen()`
    then makes it read-only, so that what a run uses is what resolve decided and nothing
    changes it later (an assignment raises dataclasses.FrozenInstanceError)."""

    def __setattr__(self, name: str, value) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(
                f"{type(self).__name__}.{name}: the config is resolved and read-only"
            )
        object.__setattr__(self, name, value)

    def frozen(self):
        """This config and every config inside it, read-only from now on; returns self."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for part in value if isinstance(value, list) else [value]:
                if isinstance(part, Schema):
                    part.frozen()
        object.__setattr__(self, "_frozen", True)
        return self


def require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def require_positive(key: str, value: int | float) -> None:
    if value < 1:
        raise ConfigError(f"{key}={value} must be >= 1")


def require_fraction(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{key}={value} must be in [0, 1)")


def require_window(key: str, value: int, context: int) -> None:
    if not 1 <= value <= context:
        raise ConfigError(
            f"{key}={value} must be between 1 and model.max_position_embeddings={context}"
        )


def batch_layout(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps, or a ConfigError naming the numbers that do not divide."""
    per_step = micro_batch * world_size
    if micro_batch < 1 or global_batch < 1 or global_batch % per_step:
        raise ConfigError(
            f"global_batch_size={global_batch} is not a multiple of micro_batch_size="
            f"{micro_batch} x world size {world_size} = {per_step}"
        )
    return global_batch // per_step


def require_unread(prefix: str, given, default, why: str, keys: tuple[str, ...] = ()) -> None:
    """Keys of `given` (a config part) that differ from `default` are set but not read in this
    run: a ConfigError naming the first and `why` (e.g. `lora.alpha=32 is not read: ...`)."""
    for f in dataclasses.fields(given):
        if keys and f.name not in keys:
            continue
        value = getattr(given, f.name)
        if value != getattr(default, f.name):
            shown = value if not dataclasses.is_dataclass(value) else "{...}"
            raise ConfigError(f"{prefix}{f.name}={shown} is not read: {why}")
