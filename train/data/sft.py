"""Supervised fine-tuning records -> token ids and labels.

Formats (JSON lines, a JSON array, or `hf:NAME` where a hub is reachable), field names
configurable:

    alpaca              {"instruction", "input", "output"}: Stanford Alpaca's prompt template
    prompt_completion   {"prompt", "completion"}: the prompt as written
    chat                {"messages": [{"role", "content"}, ...]}: rendered with a chat template
                        (the tokenizer's `chat_template` if it has one, else `neotrain`, below;
                        Jinja as in transformers, so a team can bring its own)

Labels are the token ids where the loss counts and -100 elsewhere (Hugging Face's convention):
the response only by default (`train_on_prompt` adds the prompt), for chats the assistant turns
only. The end-of-text token closes every example and is trained. An example longer than
`max_tokens` loses tokens from the start of its prompt (counted), or with strict=true stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from train.config.sft import SftFieldsConfig
from train.data.records import BadItem, Record, Skipped, read_records, require
from train.errors import ConfigError

IGNORE = -100
FORMATS = ("alpaca", "prompt_completion", "chat")

# Stanford Alpaca's two prompts (with and without an input), as published with its data.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# The default chat template (a tokenizer without one, like GPT-2's): one line naming the role,
# the content, a blank line; `add_generation_prompt` opens the assistant's turn.
CHAT_TEMPLATES = {
    "neotrain": (
        "{% for message in messages %}"
        "<|{{ message['role'] }}|>\n{{ message['content'] }}\n\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str  # file:line of the record
    prompt_length: int  # tokens before the first response token (what truncation may cut)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class Examples:
    examples: list[Example]
    skipped: Skipped = field(default_factory=Skipped)
    truncated: int = 0  # examples that lost prompt tokens to max_tokens


def read_examples(
    path: str,
    format: str,
    tokenizer,
    max_tokens: int,
    *,
    fields: SftFieldsConfig | None = None,
    train_on_prompt: bool = False,
    chat_template: str | None = None,
    strict: bool = False,
    split: str | None = None,
) -> Examples:
    """Every usable record of `path` as an Example; bad records are named (file:line), counted
    and skipped, or with strict=true stop."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {', '.join(FORMATS)}")
    fields = fields or SftFieldsConfig()
    out = Examples([])
    for record in read_records(path, out.skipped, strict, split):
        try:
            if format == "chat":
                template = chat_template or default_template(tokenizer)
                key = "sft.chat_template" if chat_template else "the tokenizer's chat_template"
                pieces = chat_pieces(record, fields, template, key)
            else:
                pieces = prompt_response(record, format, fields)
            example = encode(record.where, pieces, tokenizer, train_on_prompt)
        except BadItem as e:
            out.skipped.add(str(e), strict)
            continue
        if len(example) > max_tokens:
            example = truncate(example, max_tokens, strict)
            if example is None:
                out.skipped.add(
                    f"{record.where}: the response alone is longer than {max_tokens} tokens", strict
                )
                continue
            out.truncated += 1
        out.examples.append(example)
    return out


def prompt_response(record: Record, format: str, fields: SftFieldsConfig) -> list[tuple[str, bool]]:
    """[(prompt text, False), (response text, True)]."""
    if format == "alpaca":
        instruction = require(record, fields.instruction, str, "a string")
        extra = record.value.get(fields.input) or ""
        if not isinstance(extra, str):
            raise BadItem(f"{record.where}: {fields.input!r} must be a string")
        response = require(record, fields.output, str, "a string")
        template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=instruction, input=extra)
    else:
        prompt = require(record, fields.prompt, str, "a string")
        response = require(record, fields.completion, str, "a string")
    if not response.strip():
        key = fields.output if format == "alpaca" else fields.completion
        raise BadItem(f"{record.where}: empty response ({key!r})")
    return [(prompt, False), (response, True)]


def chat_pieces(
    record: Record, fields: SftFieldsConfig, template: str, key: str = "sft.chat_template"
) -> list[tuple[str, bool]]:
    """The rendered conversation cut at message boundaries: each piece is what rendering one
    more message adds, trained if that message is the assistant's. `key`: where the template
    came from, for the error when it is no Jinja."""
    messages = require(record, fields.messages, list, "a list of {role, content}")
    for i, m in enumerate(messages):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise BadItem(f"{record.where}: message {i} needs string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadItem(f"{record.where}: no assistant turn to learn from")
    render = chat_renderer(template, key, record.where)
    pieces, before = [], ""
    for i, m in enumerate(messages):
        text = render(messages=messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(before):
            raise BadItem(
                f"{record.where}: the chat template does not render message {i} as an "
                "extension of the messages before it"
            )
        if m["role"] == "assistant":
            # The assistant's header is prompt; what follows it is trained.
            opened = render(messages=messages[:i], add_generation_prompt=True)
            if opened.startswith(before) and text.startswith(opened):
                pieces.append((opened[len(before) :], False))
                before = opened
        pieces.append((text[len(before) :], m["role"] == "assistant"))
        before = text
    return [(t, trained) for t, trained in pieces if t]


def chat_renderer(template: str, key: str, where: str):
    """`render(messages=..., add_generation_prompt=...)` of a chat template (Jinja text). A
    template that does not compile is a ConfigError naming `key`; one that fails on the record
    at `where` (transformers' templates call raise_exception on what they do not take) a
    BadItem naming the record."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        compiled = _compiled(template)
    except TemplateSyntaxError as e:
        raise ConfigError(f"{key}: not a Jinja template ({e.message}, line {e.lineno})") from None

    def render(**values) -> str:
        try:
            return compiled(**values)
        except TemplateError as e:
            raise BadItem(f"{where}: the chat template failed: {e}") from None

    return render


@cache
def _compiled(template: str):
    """A chat template compiled as transformers compiles them (sandboxed Jinja, trim_blocks,
    lstrip_blocks, raise_exception)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render


def default_template(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATES["neotrain"]


def encode(where: str, pieces: list[tuple[str, bool]], tokenizer, train_on_prompt: bool):
    """Pieces encoded one by one (a piece's tokens never merge with its neighbour's), then the
    end-of-text token, which is trained."""
    ids, labels, prompt_length = [], [], None
    for text, trained in pieces:
        tokens = tokenizer.encode(text)
        if trained and prompt_length is None:
            prompt_length = len(ids)
        ids += tokens
        labels += tokens if trained or train_on_prompt else [IGNORE] * len(tokens)
    ids.append(tokenizer.eod_id)
    labels.append(tokenizer.eod_id)
    return Example(ids, labels, where, prompt_length if prompt_length is not None else len(ids))


def truncate(example: Example, max_tokens: int, strict: bool) -> Example | None:
    """Drop tokens from the start of the prompt; None if even the response does not fit."""
    excess = len(example) - max_tokens
    if strict:
        raise BadItem(
            f"{example.where}: {len(example)} tokens, longer than {max_tokens} "
            "(strict=true; without it the prompt is cut from the left)"
        )
    if excess > example.prompt_length:
        return None
    return Example(
        example.input_ids[excess:],
        example.labels[excess:],
        example.where,
        example.prompt_length - excess,
    )
