"""Preference records -> pairs of rows (train/data/preference.py): TRL's three forms, the
masking of prompts, the end-of-text token, truncation as TRL's keep_start, bad records; and
the bundled sample."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from data_prep.sample import build_dpo
from data_prep.tokenizers import load_tokenizer
from train.data.preference import IGNORE, collate_pairs, extract_prompt, read_pairs
from train.data.records import BadItem
from train.data.sft import ALPACA_PROMPT_NO_INPUT, CHAT_TEMPLATES
from train.loop.style import loops

TOKENIZER = load_tokenizer("gpt2")
EOD = TOKENIZER.eod_id


def write(tmp_path, records, name="pairs.jsonl"):
    file = tmp_path / name
    file.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(file)


def test_explicit_prompt_masks_the_prompt_and_trains_the_end_of_text(tmp_path):
    path = write(tmp_path, [{"prompt": "Q: sky?\nA:", "chosen": " Blue.", "rejected": " Red!"}])
    (pair,) = read_pairs(path, TOKENIZER, 64).pairs
    prompt = TOKENIZER.encode("Q: sky?\nA:")
    assert pair.prompt_length == len(prompt)
    assert pair.chosen == prompt + TOKENIZER.encode(" Blue.") + [EOD]
    assert pair.rejected == prompt + TOKENIZER.encode(" Red!") + [EOD]
    batch = collate_pairs([pair], pad_id=EOD)
    assert batch["input_ids"].shape == (2, max(len(pair.chosen), len(pair.rejected)))
    for row, ids in enumerate((pair.chosen, pair.rejected)):
        targets = batch["targets"][row]
        # the prompt is never a target; each response token is, the end-of-text token too
        trained = [int(t) for t in targets if t != IGNORE]
        assert trained == ids[pair.prompt_length :]
        assert trained[-1] == EOD
        assert (targets[: pair.prompt_length - 1] == IGNORE).all()
        assert batch["response_tokens"][row] == len(ids) - pair.prompt_length
    # the shorter row is padded with no target
    short = int(np.argmin([len(pair.chosen), len(pair.rejected)]))
    assert batch["targets"][short][-1] == IGNORE


def test_implicit_prompt_is_the_shared_prefix_as_trl_cuts_it(tmp_path):
    record = {
        "chosen": "\n\nHuman: Is it blue?\n\nAssistant: Yes it is.",
        "rejected": "\n\nHuman: Is it blue?\n\nAssistant: No way.",
    }
    (pair,) = read_pairs(write(tmp_path, [record]), TOKENIZER, 64).pairs
    prompt = TOKENIZER.encode("\n\nHuman: Is it blue?\n\nAssistant:")
    assert pair.chosen == prompt + TOKENIZER.encode(" Yes it is.") + [EOD]
    assert pair.rejected[len(prompt) :] == TOKENIZER.encode(" No way.") + [EOD]
    # TRL's extract_prompt, including where one text is a prefix of the other
    assert extract_prompt("x", "ab cd", "ab ce") == ("ab c", "d", "e")
    assert extract_prompt("x", "abc", "abcd") == ("ab", "c", "cd")
    assert extract_prompt("x", "a b", "a c") == ("a", " b", " c")


def test_conversations_render_with_the_chat_template(tmp_path):
    user = {"role": "user", "content": "Colour of the sky?"}
    good = {"role": "assistant", "content": "Blue."}
    bad = {"role": "assistant", "content": "Loud."}
    explicit = {"prompt": [user], "chosen": [good], "rejected": [bad]}
    implicit = {"chosen": [user, good], "rejected": [user, bad]}
    one, two = read_pairs(
        write(tmp_path, [explicit, implicit]),
        TOKENIZER,
        64,
        chat_template=CHAT_TEMPLATES["neotrain"],
    ).pairs
    assert one.rows() == two.rows()  # the same conversation in both forms
    assert one.prompt_length == two.prompt_length
    prompt = TOKENIZER.encode("<|user|>\nColour of the sky?\n\n<|assistant|>\n")
    assert one.chosen == prompt + TOKENIZER.encode("Blue.\n\n") + [EOD]
    assert one.rejected == prompt + TOKENIZER.encode("Loud.\n\n") + [EOD]


def test_truncation_keeps_the_start_as_trl_and_counts(tmp_path):
    long = " ".join(["word"] * 80)
    records = [
        {"prompt": "Short prompt:", "chosen": long, "rejected": " no"},
        {"prompt": long, "chosen": " yes", "rejected": " no"},  # the prompt fills the context
        {"prompt": "Fine:", "chosen": " yes", "rejected": " no"},
    ]
    path = write(tmp_path, records)
    read = read_pairs(path, TOKENIZER, 32)
    assert read.truncated == 1 and read.skipped.count == 1
    assert f"{path}:2: the prompt alone fills the 32-token context" in read.skipped.examples[0]
    cut, fine = read.pairs
    prompt = TOKENIZER.encode("Short prompt:")
    assert cut.chosen == (prompt + TOKENIZER.encode(long))[:32]  # the response's end is lost
    assert cut.rejected == prompt + TOKENIZER.encode(" no") + [EOD]  # it fits: untouched
    assert fine.chosen[-1] == EOD
    with pytest.raises(BadItem, match=rf"{path}:1: \d+ tokens, longer than 32 .*strict=true"):
        read_pairs(path, TOKENIZER, 32, strict=True)


@pytest.mark.parametrize(
    "record, why",
    [
        ("not json", "not JSON"),
        ('["a", "list"]', "a JSON list, not an object"),
        ({"prompt": "p", "chosen": "a"}, "'chosen' and 'rejected' must both be strings"),
        ({"prompt": "p", "chosen": "a", "rejected": 3}, "must both be strings"),
        ({"prompt": "p", "chosen": " a", "rejected": " a"}, "chosen and rejected are the same"),
        ({"prompt": "p", "chosen": "   ", "rejected": "b"}, "empty response ('chosen')"),
        ({"chosen": "", "rejected": "b"}, "an empty chosen or rejected response"),
        (
            {"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "x"}]},
            "message 0 needs string 'role' and 'content'",
        ),
    ],
)
def test_bad_records_are_named_counted_and_skipped_or_fatal(tmp_path, record, why):
    fine = {"prompt": "p:", "chosen": " yes", "rejected": " no"}
    path = write(tmp_path, [fine, record, fine])
    read = read_pairs(path, TOKENIZER, 64)
    assert len(read.pairs) == 2 and read.skipped.count == 1
    assert read.skipped.examples[0].startswith(f"{path}:2: ")
    assert why in read.skipped.examples[0]
    with pytest.raises(BadItem, match=f"{path}:2: .*strict=true stops"):
        read_pairs(path, TOKENIZER, 64, strict=True)


def test_other_field_names(tmp_path):
    from train.config.dpo import DpoFieldsConfig

    path = write(tmp_path, [{"q": "p:", "good": " yes", "bad": " no"}])
    fields = DpoFieldsConfig(prompt="q", chosen="good", rejected="bad")
    (pair,) = read_pairs(path, TOKENIZER, 64, fields=fields).pairs
    assert pair.chosen == TOKENIZER.encode("p:") + TOKENIZER.encode(" yes") + [EOD]


def test_bundled_sample_is_what_its_script_builds(tmp_path):
    """The builder is deterministic and the file is its output; its prompt is neo sft's Alpaca
    template (data_prep keeps its own copy)."""
    assert build_dpo.ALPACA_PROMPT_NO_INPUT == ALPACA_PROMPT_NO_INPUT
    bundled = build_dpo.OUTPUT.read_text(encoding="utf-8")
    built = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build_dpo.pairs())
    assert built == bundled
    records = [json.loads(line) for line in bundled.splitlines()]
    assert 300 <= len(records) <= 400
    assert all(r["chosen"] != r["rejected"] for r in records)
    kinds = {r["meta"]["rejected"].split(":")[0] for r in records}
    assert kinds == {"mismatched", "corrupted"}
    read = read_pairs(str(build_dpo.OUTPUT), TOKENIZER, 2048)
    assert len(read.pairs) == len(records) and read.skipped.count == 0
    # documented where the other samples are
    provenance = (ROOT / "data_prep" / "sample" / "PROVENANCE.md").read_text()
    assert "dpo_pairs.jsonl" in provenance and "build_dpo.py" in provenance


def test_the_looping_set_has_a_third_of_its_rejected_responses_looping(tmp_path):
    """`build_dpo.py --looping FILE`: mismatched, shuffled and looping in turn; the looping ones
    loop by the measure neo dpo reports (train/loop/style.py), the chosen ones rarely do."""
    out = tmp_path / "looping.jsonl"
    subprocess.run([sys.executable, str(build_dpo.__file__), "--looping", str(out)], check=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == build_dpo.pairs(looping_kind=True) and len(records) == 400
    hows = [r["meta"]["rejected"].split(":")[0] for r in records[:3]]
    assert hows == ["mismatched", "corrupted", "corrupted"]
    looping = [r for r in records if r["meta"]["rejected"].endswith("words looping")]
    assert len(looping) == 133
    assert sum(loops(r["rejected"]) for r in looping) >= 0.95 * len(looping)
    assert sum(loops(r["chosen"]) for r in records) <= 0.05 * len(records)


def test_a_looping_rejection_opens_as_the_answer_then_repeats_a_run_of_its_words():
    rng = random.Random(0)
    text = "Return True if more progress can be made and False otherwise."
    words = text.split()
    for _ in range(100):
        out = build_dpo.looping(text, rng).split()
        assert len(out) >= len(words) and loops(" ".join(out))
        start = next(i for i, (a, b) in enumerate(zip(out, words, strict=False)) if a != b)
        assert 1 <= start < len(words)  # the answer's opening words, then it goes round
    short = build_dpo.looping("Return a list.", rng)  # too short to loop: shuffled instead
    assert sorted(short.split()) == sorted(["Return", "a", "list."])


def test_build_script_runs_without_train_on_the_path(tmp_path):
    """data_prep is torch-free and imports nothing of train/: the script runs alone."""
    code = "import runpy; runpy.run_path('data_prep/sample/build_dpo.py')"
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.modules['torch'] = None; {code}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_a_chat_template_that_is_no_jinja_or_fails_on_a_record_is_a_user_mistake(tmp_path):
    from train.errors import ConfigError

    user = {"role": "user", "content": "Hi"}
    record = {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "Yo"}],
        "rejected": [{"role": "assistant", "content": "No"}],
    }
    path = write(tmp_path, [record, record])
    with pytest.raises(ConfigError, match=r"^dpo.chat_template: not a Jinja template \("):
        read_pairs(path, TOKENIZER, 64, chat_template="{% for %}")
    failing = "{% for m in messages %}{{ raise_exception('no ' + m['role']) }}{% endfor %}"
    read = read_pairs(path, TOKENIZER, 64, chat_template=failing)
    assert read.pairs == [] and read.skipped.count == 2
    assert read.skipped.examples[0].startswith(f"{path}:1: the chat template failed: ")
