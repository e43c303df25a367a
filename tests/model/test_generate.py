"""Generation (train/model/decoding.py, the model's KV cache) against Hugging Face's generate
and its logits processors, on the same weights."""

import pytest
import torch
from conftest import tiny_config
from transformers import GPTNeoConfig, GPTNeoForCausalLM
from transformers.generation import logits_process as hf_processors

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.hf import config_from_hf, state_dict_from_hf
from train.checkpoints.load import load_model, model_from_state
from train.config.evaluation import GenerationConfig
from train.config.model import expand_attention_types
from train.errors import ConfigError
from train.model.decoding import generate, generate_ids
from train.model.gpt import GPT
from train.model.sampling import Processors, StopStrings

V, EOS = 211, 210  # a small vocabulary whose last id is the end-of-text token
KINDS = {
    "global": [[["global"], 2]],
    "local": [[["local"], 2]],
    "strided": [[["strided"], 2]],
    "mixed": [[["global", "local", "strided"], 1]],
}


def random_model(attention_types=KINDS["mixed"], backend="blockwise", window=6, init=0.3):
    config = tiny_config(
        vocab_size=V,
        max_position_embeddings=96,
        hidden_size=32,
        num_heads=2,
        attention_types=attention_types,
        num_layers=len(expand_attention_types(attention_types)),
        window_size=window,
        sparse_stride=3,
        attention_backend=backend,
        # 0.3: peaked predictions, no near-ties for float noise to flip
        initializer_range=init,
    )
    return GPT(config).init_weights(torch.Generator().manual_seed(0)).eval()


def prompts(lengths=(3, 11, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V - 1, (n,), generator=g).tolist() for n in lengths]


# --------------------------------------------------------------------------------------------
# the cache


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "backend",
    # flex's forward runs on CPU under torch.compile (compiling takes a while: slow)
    ["dense", "blockwise", pytest.param("flex", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("lengths", [(1, 4, 13), (5,)], ids=["3 rows", "1 row"])
def test_cached_decoding_gives_the_logits_of_a_full_forward_at_every_step(kind, backend, lengths):
    """Rows of different lengths (window 6), 30 steps: every row passes the window. (With
    GPT-Neo's initialisation the logits are O(1): one key too few in a window moves them by
    ~3e-2.) One row exercises the unmasked path (every slot filled)."""
    model = random_model(KINDS[kind], backend, init=0.02)  # prefill with `backend`
    reference = random_model(KINDS[kind], "dense", init=0.02)  # the same weights
    lengths = torch.tensor(lengths)
    g = torch.Generator().manual_seed(2)
    sequences = torch.randint(0, V, (len(lengths), 50), generator=g)
    ids = sequences[:, : int(lengths.max())].clone()
    logits, cache = model.prefill(ids, lengths, capacity=50)
    rows = torch.arange(len(lengths))
    with torch.no_grad():
        for step in range(30):
            for row, length in enumerate(lengths.tolist()):
                full = reference(sequences[row : row + 1, : length + step])[0, -1]
                torch.testing.assert_close(logits[row], full, atol=1e-5, rtol=1e-5)
            logits = model.decode(sequences[rows, lengths + step], cache)


def test_local_layers_cache_stays_the_window_while_global_layers_hold_every_position():
    model = random_model(KINDS["mixed"], window=6)
    ids = torch.tensor([prompts((5,))[0]])
    logits, cache = model.prefill(ids, torch.tensor([5]), capacity=90)
    per_slot = 2 * 2 * 16 * 4  # k and v, heads, head size, fp32 bytes
    sizes = []
    for _ in range(80):
        sizes.append(cache.nbytes("local"))
        logits = model.decode(logits.argmax(-1), cache)
    assert set(sizes) == {6 * per_slot}  # window slots, however long the sequence grows
    assert cache.nbytes("global") == 90 * per_slot
    assert cache.nbytes("strided") == 90 * per_slot


def test_decoding_past_the_context_is_an_error_that_says_so():
    model = random_model()
    with pytest.raises(ConfigError, match="max_position_embeddings=96.*truncate=left"):
        generate_ids(model, [[1] * 90], GenerationConfig(max_new_tokens=10), eos_id=EOS)


def test_truncate_left_slides_the_context_like_an_uncached_loop():
    model = random_model(window=6)
    prompt = prompts((90,))[0]
    config = GenerationConfig(max_new_tokens=12, truncate="left")
    out = generate_ids(model, [prompt], config, eos_id=EOS)[0][0]
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(len(out.token_ids)):
            token = int(model(torch.tensor([ids[-96:]]))[0, -1].argmax())
            expected.append(token)
            ids.append(token)
            if token == EOS:
                break
    assert out.token_ids == expected


# --------------------------------------------------------------------------------------------
# against transformers' generate


def hf_and_ours(attention_types=(("global", "local"), 2), window=6):
    attention_types = [[list(attention_types[0]), attention_types[1]]]
    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=V,
        max_position_embeddings=96,
        hidden_size=32,
        num_layers=len(expand_attention_types(attention_types)),
        num_heads=2,
        attention_types=attention_types,
        window_size=window,
        initializer_range=0.3,
        eos_token_id=EOS,
        bos_token_id=EOS,
    )
    hf = GPTNeoForCausalLM(config).eval()
    hf.config._attn_implementation = "eager"
    ours = model_from_state(
        config_from_hf(config.to_dict(), "test"), state_dict_from_hf(hf.state_dict(), "test")
    ).eval()
    return hf, ours


def hf_generate(hf, batch, **kwargs):
    """Left-padded batch, as Hugging Face generates a batch: new tokens per row."""
    T = max(map(len, batch))
    ids = torch.full((len(batch), T), EOS)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    out = hf.generate(
        ids,
        attention_mask=mask,
        pad_token_id=EOS,
        eos_token_id=EOS,
        return_dict_in_generate=True,
        output_logits=True,
        output_scores=True,
        **kwargs,
    )
    return out, out.sequences[:, T:].tolist()


def assert_same_tokens(ours, hf_rows):
    flat = [s for per_prompt in ours for s in per_prompt]
    assert len(flat) == len(hf_rows)
    for s, row in zip(flat, hf_rows, strict=True):
        n = len(s.token_ids)
        assert s.token_ids == row[:n]
        assert all(t == EOS for t in row[n:])  # Hugging Face pads finished rows
        assert s.finish_reason == ("eos" if s.token_ids[-1] == EOS else "length")


DETERMINISTIC = {
    "greedy": dict(max_new_tokens=30),
    "greedy_repetition_penalty": dict(max_new_tokens=30, repetition_penalty=1.3),
    "beams": dict(max_new_tokens=25, num_beams=3),
    "beams_return_2_length_penalty": dict(
        max_new_tokens=25, num_beams=4, num_return_sequences=2, length_penalty=0.7
    ),
    "beams_early_stopping": dict(max_new_tokens=25, num_beams=3, early_stopping=True),
    "beams_never_penalised": dict(
        max_new_tokens=25, num_beams=3, early_stopping="never", repetition_penalty=1.2
    ),
    "max_length": dict(max_new_tokens=None, max_length=30),
}


@pytest.mark.parametrize("case", DETERMINISTIC)
def test_greedy_and_beam_search_equal_transformers_token_for_token(case):
    """Prompts of 3, 11 and 7 tokens around a window of 6, decoded 25-30 tokens past it, in one
    batch (Hugging Face left-pads it)."""
    hf, ours = hf_and_ours()
    batch = prompts()
    kwargs = DETERMINISTIC[case]
    out = generate_ids(ours, batch, GenerationConfig(**kwargs), eos_id=EOS)
    hf_out, rows = hf_generate(hf, batch, do_sample=False, **kwargs)
    assert_same_tokens(out, rows)
    flat = [s for per_prompt in out for s in per_prompt]
    if kwargs.get("num_beams", 1) > 1:
        scores = torch.tensor([s.score for s in flat])
        torch.testing.assert_close(scores, hf_out.sequences_scores, atol=1e-4, rtol=1e-5)
    else:  # per-token log-probabilities: the raw logits' log-softmax at the chosen tokens
        for i, s in enumerate(flat):
            expected = [
                torch.log_softmax(step_logits[i].float(), -1)[t].item()
                for step_logits, t in zip(hf_out.logits, s.token_ids, strict=False)
            ]
            assert s.logprobs == pytest.approx(expected, abs=1e-4)


SAMPLED = {
    "temperature_top_k_top_p": dict(
        max_new_tokens=30,
        do_sample=True,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        num_return_sequences=2,
    ),
    "plain": dict(max_new_tokens=30, do_sample=True, top_k=0),
    "beam_sample": dict(max_new_tokens=20, do_sample=True, num_beams=2, top_k=0),
}


@pytest.mark.parametrize("case", SAMPLED)
def test_sampling_with_a_seed_equals_transformers_with_the_same_seed(case):
    """Both draw from torch.multinomial on the same probabilities in the same order, so with
    the same seed the draws coincide."""
    hf, ours = hf_and_ours()
    batch = prompts()
    kwargs = SAMPLED[case]
    first = generate_ids(
        ours,
        batch,
        GenerationConfig(seed=7, **kwargs),
        eos_id=EOS,
        generator=torch.Generator().manual_seed(7),
    )
    torch.manual_seed(7)
    _, rows = hf_generate(hf, batch, **kwargs)
    assert_same_tokens(first, rows)
    again = generate_ids(
        ours,
        batch,
        GenerationConfig(seed=7, **kwargs),
        eos_id=EOS,
        generator=torch.Generator().manual_seed(7),
    )
    assert again == first


def test_real_text_on_a_trained_model_equals_transformers(trained_gpt2_model):
    """The exported directory under transformers and our checkpoint, GPT-2 tokenizer, prompts
    shorter and longer than the window of 16, greedy and beam search."""
    hf = GPTNeoForCausalLM.from_pretrained(trained_gpt2_model / "hf").eval()
    hf.config._attn_implementation = "eager"
    ours = load_model(trained_gpt2_model / "ckpt").eval()
    tokenizer = load_tokenizer("gpt2")
    texts = [
        "Hello, I'm a language model,",
        "The history of the city begins in the early nineteenth century, when the first "
        "settlers arrived from the east and built",
        "In mathematics,",
    ]
    outputs = {}
    for kwargs in (dict(max_new_tokens=40), dict(max_new_tokens=30, num_beams=3)):
        config = GenerationConfig(**kwargs)
        ours_out = generate(ours, tokenizer, texts, config)
        ids = [tokenizer.encode(t) for t in texts]
        T = max(map(len, ids))
        padded = torch.tensor([[tokenizer.eod_id] * (T - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids])
        hf_rows = hf.generate(
            padded,
            attention_mask=mask,
            pad_token_id=tokenizer.eod_id,
            eos_token_id=tokenizer.eod_id,
            do_sample=False,
            **kwargs,
        )[:, T:].tolist()
        for per_prompt, row in zip(ours_out, hf_rows, strict=True):
            g = per_prompt[0]
            assert g.token_ids == row[: len(g.token_ids)]
            assert g.text == tokenizer.decode(row[: len(g.token_ids)]).removesuffix(
                tokenizer.eod_token
            )
        outputs[kwargs.get("num_beams", 1)] = ours_out
    assert len(tokenizer.encode(texts[1])) > 16


# --------------------------------------------------------------------------------------------
# processors against transformers' own


def hf_chain(config: GenerationConfig, min_keep=1):
    chain = []
    if config.repetition_penalty != 1.0:
        chain.append(hf_processors.RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature != 1.0:
            chain.append(hf_processors.TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            chain.append(hf_processors.TopKLogitsWarper(config.top_k, min_tokens_to_keep=min_keep))
        if config.top_p < 1.0:
            chain.append(hf_processors.TopPLogitsWarper(config.top_p, min_tokens_to_keep=min_keep))
    return hf_processors.LogitsProcessorList(chain)


@pytest.mark.parametrize(
    "settings",
    [
        dict(repetition_penalty=1.5),
        dict(do_sample=True, temperature=0.7),
        dict(do_sample=True, top_k=5),
        dict(do_sample=True, top_p=0.8),
        dict(do_sample=True, top_p=0.05),  # fewer than min_tokens_to_keep survive
        dict(do_sample=True, temperature=1.3, top_k=40, top_p=0.95, repetition_penalty=0.8),
    ],
)
@pytest.mark.parametrize("min_keep", [1, 2])
def test_processors_give_transformers_logits(settings, min_keep):
    config = GenerationConfig(**settings)
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(4, V, generator=g) * 3
    history = torch.randint(0, V, (4, 12), generator=g)
    seen = torch.zeros(4, V, dtype=torch.bool).scatter_(1, history, True)
    ours = Processors(config, min_tokens_to_keep=min_keep)(scores.clone(), seen)
    theirs = hf_chain(config, min_keep)(history, scores.clone())
    torch.testing.assert_close(ours, theirs)


def test_stop_strings_end_a_sequence_when_they_end_in_its_newest_token():
    tokenizer = load_tokenizer("gpt2")
    stop = StopStrings(tokenizer, ["\n\n", "END", "lo w"])
    enc = tokenizer.encode
    assert stop.hit(enc("one two\n\n"))
    assert stop.hit(enc("one two") + enc(" THE END"))
    assert len(enc(" world")) == 1
    assert stop.hit(enc("hel") + enc("lo") + enc(" world"))  # it ends inside the newest token
    assert not stop.hit(enc("END of it") + enc(" more"))  # it ended before the newest token
    assert not stop.hit(enc("nothing here"))


def test_stop_strings_stop_generation(trained_gpt2_model):
    """Sampled with a seed, so that the text has words: a small model's greedy continuation can
    be blank lines only, depending on the last bits of its training."""
    model = load_model(trained_gpt2_model / "ckpt").eval()
    tokenizer = load_tokenizer("gpt2")
    settings = dict(max_new_tokens=40, do_sample=True, top_k=40, seed=0)
    free = generate(model, tokenizer, "The", GenerationConfig(**settings))[0][0]
    words = free.text.split()
    assert len(words) > 3, free.text
    stop_at = words[2]
    stopped = generate(
        model, tokenizer, "The", GenerationConfig(**settings, stop_strings=[stop_at])
    )[0][0]
    assert stopped.finish_reason == "stop"
    assert stop_at in stopped.text
    assert free.token_ids[: len(stopped.token_ids)] == stopped.token_ids
    assert stop_at not in tokenizer.decode(stopped.token_ids[:-1])


# --------------------------------------------------------------------------------------------
# the Python API and bad settings


def test_generate_api_returns_text_and_ids_per_prompt(trained_gpt2_model):
    model = load_model(trained_gpt2_model / "ckpt").eval()
    tokenizer = load_tokenizer("gpt2")
    config = GenerationConfig(max_new_tokens=12, do_sample=True, num_return_sequences=3, seed=0)
    out = generate(model, tokenizer, ["Hello, I'm a language model,", ""], config, batch_size=1)
    assert [len(per_prompt) for per_prompt in out] == [3, 3]
    for per_prompt in out:
        for g in per_prompt:
            assert g.text == tokenizer.decode(g.token_ids).removesuffix(tokenizer.eod_token)
            assert len(g.logprobs) == len(g.token_ids) and all(lp <= 0 for lp in g.logprobs)
    assert out[1][0].prompt_ids == [tokenizer.eod_id]  # an empty prompt starts at end-of-text
    again = generate(model, tokenizer, ["Hello, I'm a language model,", ""], config, batch_size=1)
    assert again == out  # the seed makes sampling reproducible


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(num_return_sequences=2), "Greedy methods .* num_return_sequences"),
        (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences \(3\).*num_beams \(2\)"),
        (dict(do_sample=True, temperature=0.0), "temperature=0.0 has to be a strictly positive"),
        (dict(top_p=1.5), "top_p"),
        (dict(early_stopping="sometimes"), "early_stopping must be a boolean or 'never'"),
        (dict(max_new_tokens=0), "max_new_tokens must be greater than 0"),
        (dict(truncate="right"), "truncate='right' is not one of error, left"),
    ],
)
def test_impossible_settings_are_refused_as_transformers_refuses_them(settings, message):
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**settings).validate()


def test_max_length_shorter_than_the_prompt_is_refused():
    with pytest.raises(ConfigError, match=r"max_length=5 leaves no room .* \(11 tokens\)"):
        generate_ids(
            random_model(),
            prompts(),
            GenerationConfig(max_new_tokens=None, max_length=5),
            eos_id=EOS,
        )


def test_device_map_auto_with_blocks_on_disk_generates_the_same(tmp_path):
    """accelerate's big-model dispatch (CPU memory capped below the model's size, the last
    blocks offloaded to disk): the cache lives beside each block and the tokens do not change."""
    import copy

    from train.distributed.devices import ACCELERATORS
    from train.distributed.placement import dispatch_auto

    model = random_model([[["global", "local"], 2]])
    reference = copy.deepcopy(model)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    dispatched = dispatch_auto(
        model, ACCELERATORS["cpu"], max_memory={"cpu": int(size * 0.7)}, offload_dir=tmp_path
    )
    assert "disk" in dispatched.hf_device_map.values()
    for settings in (dict(max_new_tokens=20), dict(max_new_tokens=15, num_beams=3)):
        config = GenerationConfig(**settings)
        expected = generate_ids(reference, prompts(), config, eos_id=EOS)
        assert generate_ids(dispatched, prompts(), config, eos_id=EOS) == expected
