"""The counters of a run: what the loop advances and what trainer_state.json stores."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global samples read; the data order follows from it
    tokens: int = 0  # tokens trained on (the LR schedule's clock with optim.unit=tokens)
    bad_steps_in_row: int = 0  # consecutive steps whose loss was not finite
    skipped_steps: int = 0  # optimizer steps skipped in all (non-finite gradients)

    def advance(self, samples: int, tokens: int, applied: bool) -> None:
        """One optimizer step done: `samples` and `tokens` consumed, applied or skipped."""
        self.step += 1
        self.consumed_samples += samples
        self.tokens += tokens
        self.bad_steps_in_row = 0 if applied else self.bad_steps_in_row + 1
        self.skipped_steps += 0 if applied else 1

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        return cls(**{f.name: saved[f.name] for f in fields(cls)})
