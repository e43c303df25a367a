"""neo eval's parts: tokenization at the boundary, rolling windows, the batched scorer, the task
formats and their bad records, few-shot prompts, and val per source."""

import importlib.util
import json
import math
import random

import numpy as np
import pytest
import torch
from lm_eval import utils as harness_utils

from data_prep.tokenizers import load_tokenizer
from tests.conftest import SHARED_EVAL, needs_shared_eval, tiny_config
from train.data.records import BadItem
from train.evals.harness import harness_tasks_dir
from train.evals.items import Item, wikitext_articles, wikitext_detokenize
from train.evals.runner import build_requests, fewshot_prefix
from train.evals.scoring import Request, Scorer, encode_pair, rolling_requests
from train.evals.tasks import load_task
from train.evals.val import sample_documents
from train.model.gpt import GPT

GPT2 = load_tokenizer("gpt2")
EOT = GPT2.eod_id


def harness_module(relative: str):
    """A preprocessing module of the harness's own tasks (hellaswag/utils.py, ...)."""
    path = harness_tasks_dir() / relative
    spec = importlib.util.spec_from_file_location(f"harness_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Tokenization and windows


def test_encode_pair_moves_trailing_spaces_onto_the_continuation():
    r = encode_pair(GPT2.encode, "The capital of France is ", "Paris", EOT)
    assert r.context == tuple(GPT2.encode("The capital of France is"))
    whole = GPT2.encode("The capital of France is Paris")
    assert r.context + r.continuation == tuple(whole)
    assert GPT2.decode(list(r.continuation)) == " Paris"


def test_encode_pair_takes_the_tail_of_the_whole_encoding():
    # "hello" + "world" merges across the boundary: the continuation is what follows the
    # context's own tokens in the joint encoding, not the continuation encoded alone.
    r = encode_pair(GPT2.encode, "he", "llo", EOT)
    whole = GPT2.encode("hello")
    assert r.context + r.continuation == tuple(GPT2.encode("he")) + tuple(
        whole[len(GPT2.encode("he")) :]
    )


def test_empty_context_becomes_the_end_of_text_token():
    r = encode_pair(GPT2.encode, "", " yes", EOT)
    assert r == Request((EOT,), tuple(GPT2.encode(" yes")))


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 64, 65])
def test_rolling_windows_are_the_harness_windows(n):
    tokens = list(range(100, 100 + n))
    ours = rolling_requests(tokens, EOT, max_length=16)
    theirs = [
        harness_utils.make_disjoint_window(w)
        for w in harness_utils.get_rolling_token_windows(tokens, EOT, 16, 1)
    ]
    assert [(list(r.context), list(r.continuation)) for r in ours] == theirs
    assert [t for r in ours for t in r.continuation] == tokens  # every token once


# ---------------------------------------------------------------------------------------------
# The scorer against the plain computation


def naive(model, request: Request, max_length: int) -> tuple[float, bool]:
    seq = list(request.context + request.continuation)[-(max_length + 1) :]
    inp = torch.tensor([seq[:-1]])
    logp = torch.log_softmax(model(inp)[0].float(), dim=-1)
    n = len(request.continuation)
    cont = torch.tensor(request.continuation)
    lp = logp[-n:].gather(1, cont[:, None]).sum().item()
    return lp, bool((logp[-n:].argmax(-1) == cont).all())


def test_scorer_equals_one_forward_per_request():
    torch.manual_seed(0)
    config = tiny_config(vocab_size=300, max_position_embeddings=32, window_size=8)
    model = GPT(config).init_weights().eval()
    rng = random.Random(0)
    shared = tuple(rng.randrange(300) for _ in range(12))
    requests = [Request(shared, (rng.randrange(300),)) for _ in range(4)]  # one-token choices
    requests += [Request(shared, tuple(rng.randrange(300) for _ in range(3))) for _ in range(4)]
    requests += [  # some longer than the context: cut from the left
        Request(
            tuple(rng.randrange(300) for _ in range(rng.randrange(1, 45))),
            tuple(rng.randrange(300) for _ in range(rng.randrange(1, 6))),
        )
        for _ in range(20)
    ]
    requests.append(Request(shared[:5], shared[5:9]))  # a prefix of another request's input
    scorer = Scorer(model, "cpu", max_length=32, batch_tokens=96)
    scores = scorer.score(requests)
    for i, r in enumerate(requests):
        lp, greedy = naive(model, r, 32)
        assert scores[i].logprob == pytest.approx(lp, abs=1e-4)
        assert scores[i].greedy == greedy
        assert scores[i].tokens == len(r.continuation)
    # The four one-token choices and the prefix request share forwards with others.
    assert len(scorer.plan(requests)) <= len(requests) - 4
    assert scorer.forwards_run > 1  # the token budget split the work into batches


def test_scorer_splits_batches_over_ranks_without_overlap():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=100, max_position_embeddings=16)).init_weights().eval()
    rng = random.Random(1)
    requests = [
        Request(
            tuple(rng.randrange(100) for _ in range(rng.randrange(1, 12))), (rng.randrange(100),)
        )
        for _ in range(30)
    ]
    one = Scorer(model, "cpu", 16, batch_tokens=32).score(requests)
    parts = [
        Scorer(model, "cpu", 16, batch_tokens=32, rank=r, world_size=2).score(requests)
        for r in range(2)
    ]
    assert not set(parts[0]) & set(parts[1])
    assert {**parts[0], **parts[1]} == one


def test_rolling_loglikelihood_equals_transformers_per_token_losses(tmp_path):
    """The rolling sum over windows equals the summed cross entropy that
    transformers.GPTNeoForCausalLM gives on the same windows of the same text."""
    from transformers import GPTNeoForCausalLM

    from train.checkpoints.export import export_hf
    from train.checkpoints.model_format import save_checkpoint

    torch.manual_seed(0)
    config = tiny_config(vocab_size=GPT2.vocab_size, max_position_embeddings=32, window_size=8)
    model = GPT(config).init_weights().eval()
    save_checkpoint(tmp_path / "ckpt", config, model.state_dict(), GPT2)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = GPTNeoForCausalLM.from_pretrained(tmp_path / "hf").eval()

    text = "It is a truth universally acknowledged, that a single man in possession " * 12
    tokens = GPT2.encode(text)
    assert len(tokens) > 3 * 32
    scores = Scorer(model, "cpu", 32).score(rolling_requests(tokens, EOT, 32))
    ours = math.fsum(s.logprob for s in scores.values())

    total, done = 0.0, 0
    with torch.no_grad():
        while done < len(tokens):
            end = min(done + 32, len(tokens))
            inputs = ([EOT] + tokens)[max(0, end - 32) : end]  # the 32 tokens before each target
            targets = tokens[max(0, end - 32) : end]
            logits = hf(torch.tensor([inputs])).logits[0]
            losses = torch.nn.functional.cross_entropy(
                logits, torch.tensor(targets), reduction="none"
            )
            total += losses[-(end - done) :].sum().item()
            done = end
    assert -ours == pytest.approx(total, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Task formats (fixtures in the published formats) against the harness's own preprocessing


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


HELLASWAG = [  # hellaswag_val.jsonl's fields (ctx shortened)
    {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car.",
        "ctx_b": "then",
        "ctx": "...",
        "split": "val",
        "split_type": "indomain",
        "label": 3,
        "endings": [
            ", the man adds wax to the windshield and cuts it.",
            ", a person board a ski lift  while two men [step] watch.",
            ", the man puts on a christmas coat, knitted with netting.",
            ", the man continues removing the snow on his car.",
        ],
    },
    {
        "ind": 9,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.",
        "ctx_b": "you",
        "ctx": "...",
        "split": "val",
        "split_type": "zeroshot",
        "label": "0",
        "endings": ["should water them [step] daily.", "can paint them.", "buy a car.", "sing."],
    },
]


def test_hellaswag_prompts_are_the_harness_prompts(tmp_path):
    utils = harness_module("hellaswag/utils.py")
    task = load_task("hellaswag", "hellaswag", write_jsonl(tmp_path / "h.jsonl", HELLASWAG), True)
    for item, doc in zip(task.items, HELLASWAG, strict=True):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        query = utils.preprocess(doc["activity_label"] + ": " + ctx)
        choices = [utils.preprocess(e) for e in doc["endings"]]
        assert item.pairs == [(query, " " + c) for c in choices]
        assert item.gold == int(doc["label"])
        assert item.choice_texts == choices


def test_piqa_reads_labels_from_the_published_lst_file(tmp_path):
    records = [
        {"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "bake it."},
        {"goal": "Dry wet hands", "sol1": "in a bucket", "sol2": "with a towel"},
    ]
    path = write_jsonl(tmp_path / "valid.jsonl", records)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    task = load_task("piqa", "piqa", path, True)
    assert [i.gold for i in task.items] == [0, 1]
    assert task.items[1].pairs == [
        ("Question: Dry wet hands\nAnswer:", " in a bucket"),
        ("Question: Dry wet hands\nAnswer:", " with a towel"),
    ]


def test_winogrande_partial_scoring_is_the_harness_split(tmp_path):
    pre = harness_module("winogrande/preprocess_winogrande.py")
    doc = {
        "qID": "x",
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "1",
    }  # noqa: E501
    task = load_task("w", "winogrande", write_jsonl(tmp_path / "dev.jsonl", [doc]), True)
    item = task.items[0]
    assert [c for c, _ in item.pairs] == pre.doc_to_choice(doc)
    assert {x for _, x in item.pairs} == {" " + pre.doc_to_target(doc)}
    assert item.gold == pre.doc_to_text(doc)


def test_mathqa_choices_are_the_harness_choices(tmp_path):
    utils = harness_module("mathqa/utils.py")
    doc = {
        "Problem": "a train 100 m long passes a pole in 10 sec . its speed is ?",
        "Rationale": "",
        "options": "a ) 10 m / s , b ) 20 m / s , c ) 5 , d ) 1 , e ) none of these",
        "correct": "a",
        "annotated_formula": "",
        "linear_formula": "",
        "category": "physics",
    }  # noqa: E501
    path = tmp_path / "test.json"
    path.write_text(json.dumps([doc]))
    item = load_task("mathqa", "mathqa", str(path), True).items[0]
    assert item.choice_texts == utils.doc_to_choice(doc)
    assert item.pairs[0][0] == f"Question: {doc['Problem']}\nAnswer:"
    assert item.gold == 0


@needs_shared_eval
def test_real_files_load_with_their_published_counts():
    lambada = load_task("l", "lambada_openai", str(SHARED_EVAL / "lambada_openai_test.jsonl"), True)
    assert len(lambada.items) == 5153
    pubmedqa = load_task("p", "pubmedqa", str(SHARED_EVAL / "pubmedqa_ori_pqal.json"), True)
    assert len(pubmedqa.items) == 500 and len(pubmedqa.fewshot) == 500
    articles = list(wikitext_articles(SHARED_EVAL / "wikitext-2-raw-test.raw"))
    assert len(articles) == 62  # the hub's wikitext_document_level test split
    detok = harness_module("wikitext/preprocess_wikitext.py").wikitext_detokenizer
    for article in articles[:5]:
        assert wikitext_detokenize(article.value["page"]) == detok(article.value)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_malformed_lines_are_named_counted_and_skipped(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(
        '{"query": "a", "choices": ["x", "y"], "gold": 1}\n'
        "{not json\n"
        '{"query": "b", "choices": [], "gold": 0}\n'
        '{"query": "c", "choices": ["x"], "gold": 3}\n'
        '{"query": "d", "choices": ["x", "y"], "gold": 0}\n'
    )
    task = load_task("mine", "mc", str(path), strict=False)
    assert len(task.items) == 2 and task.skipped.count == 3
    assert task.skipped.examples[0].startswith(f"{path}:2: not JSON")
    assert f"{path}:3: 'choices' must be a non-empty list" in task.skipped.examples[1]
    assert f"{path}:4: gold=3 is out of range for 1 choices" in task.skipped.examples[2]
    with pytest.raises(BadItem, match=f"{path}:2: not JSON"):
        load_task("mine", "mc", str(path), strict=True)


def test_missing_file_names_task_format_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task hellaswag: .*ctx_a.*rowanz/hellaswag"):
        load_task("hellaswag", "hellaswag", str(tmp_path / "nope.jsonl"), False)


# ---------------------------------------------------------------------------------------------
# Few-shot


def test_fewshot_prompts_repeat_with_a_seed_and_change_with_another(tmp_path):
    records = [{"query": f"Q{i}:", "choices": ["a", "b"], "gold": i % 2} for i in range(20)]
    task = load_task("mine", "mc", write_jsonl(tmp_path / "m.jsonl", records), True)
    first = build_requests(task, GPT2.encode, EOT, 1024, 3, seed=1)
    assert build_requests(task, GPT2.encode, EOT, 1024, 3, seed=1) == first
    assert build_requests(task, GPT2.encode, EOT, 1024, 3, seed=2) != first
    for item in task.items:
        prefix = fewshot_prefix(task, item, 3, seed=1)
        shots = prefix.split("\n\n")[:-1]
        assert len(shots) == 3 and item.solved not in shots  # never the item itself
        assert all(s in [i.solved for i in task.items] for s in shots)


# ---------------------------------------------------------------------------------------------
# val sampling


def test_val_sample_keeps_every_source_and_repeats_with_its_seed():
    items = [
        Item(i, f"d{i}", tokens=[1] * (50 + i), source=s)
        for i, s in enumerate(["A"] * 80 + ["B"] * 15 + ["C"] * 5)
    ]
    total = sum(len(i.tokens) for i in items)
    chosen = sample_documents(items, total // 4, seed=3)
    assert {i.source for i in chosen} == {"A", "B", "C"}
    share = {s: sum(len(i.tokens) for i in chosen if i.source == s) for s in "ABC"}
    assert share["A"] > share["B"] > share["C"]
    assert sum(share.values()) <= total // 4 + 3 * 150
    assert sample_documents(items, total // 4, seed=3) == chosen
    assert sample_documents(items, total // 4, seed=4) != chosen
    assert sample_documents(items, None, seed=3) == items
    assert np.all(np.diff([i.index for i in chosen]) > 0)


def test_device_map_auto_offloads_blocks_and_scores_the_same(tmp_path):
    """accelerate's big-model dispatch, on CPU: CPU memory capped below the model's size, so
    the last blocks are offloaded to disk and loaded as they run; the scores do not change."""
    import copy

    from train.distributed.devices import ACCELERATORS
    from train.distributed.placement import dispatch_auto

    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=500, hidden_size=64)).init_weights().eval()
    reference = copy.deepcopy(model)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    dispatched = dispatch_auto(
        model, ACCELERATORS["cpu"], max_memory={"cpu": int(size * 0.7)}, offload_dir=tmp_path
    )
    placed = dispatched.hf_device_map
    assert placed["transformer.h.0"] == "cpu" and placed["transformer.h.3"] == "disk"
    rng = random.Random(0)
    words = lambda n: tuple(rng.randrange(500) for _ in range(n))  # noqa: E731
    requests = [Request(words(rng.randrange(1, 60)), words(3)) for _ in range(10)]
    expected = Scorer(reference, "cpu", 128).score(requests)
    assert Scorer(dispatched, "cpu", 128).score(requests) == expected


def test_hub_style_names_load_through_datasets(tmp_path):
    """path=hf:NAME goes through datasets.load_dataset (a hub name where the hub or its cache is
    reachable; here a local dataset directory, which load_dataset resolves the same way)."""
    dataset = tmp_path / "lambada_like"
    dataset.mkdir()
    write_jsonl(dataset / "test.jsonl", [{"text": "one two three"}, {"text": "four five"}])
    task = load_task("lambada_openai", "lambada_openai", f"hf:{dataset}", strict=True)
    assert [i.pairs for i in task.items] == [[("one two", " three")], [("four", " five")]]
    assert task.items[0].where.startswith(f"hf:{dataset}[test][0]")
