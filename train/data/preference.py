"""Preference records -> token ids of a prompt and two responses, as TRL's DPOTrainer reads
them (TRL 1.16).

The three forms TRL accepts, each record by its own fields (field names configurable):

    explicit prompt   {"prompt": str, "chosen": str, "rejected": str}
    implicit prompt   {"chosen": str, "rejected": str}: the prompt is the longest shared prefix
                      (Anthropic hh-rlhf), cut as TRL's `extract_prompt` cuts it (a space that
                      ends the shared part stays with the responses)
    conversational    the same with lists of {"role", "content"} messages; an implicit prompt is
                      the shared leading messages. Rendered with a chat template (the
                      tokenizer's, else neotrain's: train/data/sft.py): the prompt with the
                      assistant's turn opened, each response as what follows it

The prompt and each response are encoded apart (a response's first token never merges with the
prompt's last, as in `neo sft`; TRL encodes them together and cuts where the ids diverge, which
gives the same ids wherever the boundary is a token boundary). The end-of-text token closes
each response and is trained. A pair longer than `max_tokens` is cut as TRL's default
`truncation_mode="keep_start"` cuts it: each row keeps its first max_tokens tokens (the prompt's
start, then as much of the response as fits); a pair whose prompt alone fills max_tokens has no
response token left and is skipped. Both counted; with strict=true, an over-long pair stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from train.config.dpo import DpoFieldsConfig
from train.data.packing import build_row, collate, first_fit_decreasing
from train.data.records import BadItem, Record, Skipped, read_records
from train.data.sft import IGNORE, Example, chat_renderer, default_template


@dataclass
class Pair:
    """A prompt and its two responses as ids: each row is prompt + response (+ end-of-text),
    already cut to the context."""

    where: str  # file:line of the record
    prompt_length: int  # tokens of the prompt (the same in both rows)
    chosen: list[int]  # prompt + chosen response
    rejected: list[int]  # prompt + rejected response
    # The reference model's log-probabilities of the chosen and rejected responses, once known.
    reference: tuple[float, float] | None = None

    def rows(self) -> tuple[list[int], list[int]]:
        return self.chosen, self.rejected


@dataclass
class Pairs:
    pairs: list[Pair]
    skipped: Skipped = field(default_factory=Skipped)
    truncated: int = 0  # pairs whose rows lost response tokens to max_tokens


def read_pairs(
    path: str,
    tokenizer,
    max_tokens: int,
    *,
    fields: DpoFieldsConfig | None = None,
    chat_template: str | None = None,
    strict: bool = False,
    split: str | None = None,
) -> Pairs:
    """Every usable record of `path` as a Pair; bad records are named (file:line), counted and
    skipped, or with strict=true stop."""
    fields = fields or DpoFieldsConfig()
    out = Pairs([])
    for record in read_records(path, out.skipped, strict, split):
        try:
            prompt, chosen, rejected = texts(record, fields, chat_template or tokenizer)
        except BadItem as e:
            out.skipped.add(str(e), strict)
            continue
        prompt_ids = tokenizer.encode(prompt)
        rows = [prompt_ids + tokenizer.encode(r) + [tokenizer.eod_id] for r in (chosen, rejected)]
        if max(map(len, rows)) > max_tokens:
            if strict:
                out.skipped.add(
                    f"{record.where}: {max(map(len, rows))} tokens, longer than {max_tokens} "
                    "(without strict=true the responses are cut at the end, as TRL's keep_start)",
                    strict,
                )
            if len(prompt_ids) >= max_tokens:
                out.skipped.add(
                    f"{record.where}: the prompt alone fills the {max_tokens}-token context",
                    strict,
                )
                continue
            rows = [r[:max_tokens] for r in rows]
            out.truncated += 1
        out.pairs.append(Pair(record.where, len(prompt_ids), *rows))
    return out


def texts(record: Record, fields: DpoFieldsConfig, template_or_tokenizer) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) text of a record in any of the three forms; conversations
    rendered with `template_or_tokenizer` (a template, or a tokenizer whose template to use)."""
    value, where = record.value, record.where
    chosen, rejected = value.get(fields.chosen), value.get(fields.rejected)
    conversational = is_messages(chosen) and is_messages(rejected)
    if not conversational and not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise BadItem(
            f"{where}: {fields.chosen!r} and {fields.rejected!r} must both be strings or both "
            "lists of {role, content} messages"
        )
    prompt = value.get(fields.prompt)
    # A prompt of the other kind is ignored and the prompt extracted, as TRL does.
    explicit = is_messages(prompt) if conversational else isinstance(prompt, str)
    if not explicit:
        prompt, chosen, rejected = extract_prompt(where, chosen, rejected)
    if chosen == rejected:
        raise BadItem(f"{where}: chosen and rejected are the same: no preference to learn")
    for name, response in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if not response or (isinstance(response, str) and not response.strip()):
            raise BadItem(f"{where}: empty response ({name!r})")
    if not conversational:
        return prompt, chosen, rejected
    template, key = template_or_tokenizer, "dpo.chat_template"
    if not isinstance(template, str):
        template, key = default_template(template), "the tokenizer's chat_template"
    return rendered(where, prompt, chosen, rejected, template, key)


def is_messages(value) -> bool:
    """A non-empty list of {role: str, content: str} (TRL checks the first message only; a bad
    later one is named in `rendered`)."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], dict)
        and isinstance(value[0].get("role"), str)
    )


def extract_prompt(where: str, chosen, rejected):
    """TRL's `extract_prompt`: the prompt is chosen[:i], i the first index where chosen and
    rejected differ (characters, or messages), moved one back when chosen[i - 1] is a space.
    Where one is a prefix of the other, TRL's loop ends without a difference and i is the last
    index it compared (min length - 1): kept, so the same records give the same pairs."""
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise BadItem(f"{where}: an empty chosen or rejected response")
    i = 0
    for i in range(n):
        if chosen[i] != rejected[i]:
            if i > 0 and chosen[i - 1] == " ":
                i -= 1
            break
    return chosen[:i], chosen[i:], rejected[i:]


def rendered(where: str, prompt: list, chosen: list, rejected: list, template: str, key: str):
    """A conversation's text: the prompt's messages with the assistant's turn opened (the
    generation prompt), and each response as the rest of prompt + its messages."""
    for i, m in enumerate([*prompt, *chosen, *rejected]):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise BadItem(f"{where}: message {i} needs string 'role' and 'content'")
    render = chat_renderer(template, key, where)
    opened = render(messages=prompt, add_generation_prompt=True)
    responses = []
    for messages in (chosen, rejected):
        text = render(messages=[*prompt, *messages], add_generation_prompt=False)
        if not text.startswith(opened):
            raise BadItem(
                f"{where}: the chat template does not render the conversation as an extension "
                "of its prompt with the assistant's turn opened"
            )
        responses.append(text[len(opened) :])
    return opened, *responses


def collate_pairs(
    pairs: list[Pair], pad_id: int, packed_len: int | None = None
) -> dict[str, np.ndarray]:
    """B pairs as their 2B sequences, the chosen ones first (TRL's layout), each prompt +
    response with the next token as its target where that is a response token (-100 else):

    padded (packed_len None): one sequence per row, padded at the end to the longest
        input_ids, targets  (2B, T)
    packed (packed_len, dpo.packing): the sequences packed first-fit decreasing into rows of
        at most packed_len tokens, the rows padded to the longest (TRL's `padding_free`)
        input_ids, targets  (R, T)
        positions           (R, T) restart at 0 at each sequence
        documents           (R, T) the sequence's index within its row, -1 on padding:
                            attention stays within a sequence (train/model/attention.py)
        sequences           (R, T) the sequence's index among the 2B, -1 on padding: what
                            sums each one's log-probabilities (PreferenceGPT.sequence_logps)
    and in both
        response_tokens     (2B,) response tokens of each sequence (the ipo loss averages by them)
        reference           (2B,) the reference log-probabilities (0 where not known yet)"""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompts = [p.prompt_length for p in pairs] * 2
    reference = [p.reference[0] if p.reference else 0.0 for p in pairs]
    reference += [p.reference[1] if p.reference else 0.0 for p in pairs]
    out = (
        padded(rows, prompts, pad_id)
        if packed_len is None
        else packed(rows, prompts, pad_id, packed_len)
    )
    return out | {
        "response_tokens": np.array([len(r) - p for r, p in zip(rows, prompts, strict=True)]),
        "reference": np.array(reference, dtype=np.float64),
    }


def padded(rows: list[list[int]], prompts: list[int], pad_id: int) -> dict[str, np.ndarray]:
    length = max(map(len, rows))
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    targets = np.full((len(rows), length), IGNORE, dtype=np.int64)
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        ids[i, : len(row)] = row
        # the token at position t is predicted at t - 1; the first response token's target
        # sits at the prompt's last position (none when the prompt is empty, as in TRL)
        first = max(prompt, 1)
        targets[i, first - 1 : len(row) - 1] = row[first:]
    return {"input_ids": ids, "targets": targets}


def packed(
    rows: list[list[int]], prompts: list[int], pad_id: int, packed_len: int
) -> dict[str, np.ndarray]:
    """`neo sft`'s packed rows (train/data/packing.py build_row) of the sequences, each an
    example whose labels are its response tokens (the same targets as `padded`'s). The bins
    depend only on these pairs' lengths: every rank and every resume packs them alike."""
    examples = [
        Example(row, [IGNORE] * prompt + row[prompt:], "", prompt)
        for row, prompt in zip(rows, prompts, strict=True)
    ]
    bins = first_fit_decreasing([len(r) for r in rows], packed_len)
    out = collate(
        [build_row([examples[i] for i in b], sum(len(rows[i]) for i in b), pad_id) for b in bins],
        pad_id,
    )
    documents = out["documents"]
    out["sequences"] = np.full_like(documents, -1)
    for r, b in enumerate(bins):
        used = documents[r] >= 0
        out["sequences"][r, used] = np.asarray(b)[documents[r, used]]
    return out
