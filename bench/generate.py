"""Greedy text generation: `train.model.decoding.generate_ids` (our KV cache) against Hugging Face
`GPTNeoForCausalLM.generate` on the same weights, side by side, fp32 on CPU, in one run.

    python bench/generate.py [--model 125m|tiny] [--quick] [--new-tokens 256]
                             [--long-prompt 2048] [--decode-tokens 1536] [--repeats 2]

Model: GPT-Neo layout with random weights (seeded): `125m` is GPT-Neo 125M's shape (hidden 768,
12 layers, 12 heads, window 256), `tiny` hidden 128, 4 layers, 4 heads, window 64; GPT-2
vocabulary (50,257), max_position_embeddings 2,304. The Hugging Face model is built first
(transformers' own initialisation, attn_implementation="eager") and ours is made from its
state dict (checkpoints.hf.state_dict_from_hf + checkpoints.load.model_from_state): the
same tensors.
Prompts are random token ids. Both decode greedily with end-of-text = 50256 (vocab - 1); every
run checks that each row got the full number of new tokens and whether both produced the same
tokens, and says so in the table (random weights can emit end-of-text, or two fp32 logits can
tie closely enough for the two implementations to part ways; neither is hidden).

Table 1, tokens/s: new tokens / wall seconds of the whole generate call (prefill included), the
best of `--repeats` runs after one warm-up run of both (fewer new tokens); the two
implementations take turns within every repeat, so a slow phase of a noisy machine hits both.
Hugging Face gets its prompts left-padded with an attention mask (how it batches); ours takes
the lists of ids. The long-prompt row also gives the prefill alone (best of the same repeats):
ours `GPT.prefill`, theirs one forward with use_cache=True and logits_to_keep=1 (as generate
does).

Table 2, decode time per token against generated length, batch 1, a 16-token prompt, for a
model with every layer local and one alternating global/local. Ours: `GPT.prefill`, then
`GPT.decode` in a loop fed its own argmax. Theirs stepped by hand the same way: one forward
of the prompt, then model(token, cache=DynamicCache, position_ids, logits_to_keep=1) per step
with the argmax of its logits (generate's loop without its bookkeeping; batch 1 has no padding,
so no attention mask). Step i feeds the i-th generated token; the ranges are of i, each step
timed alone, the two loops taking turns step by step (after 8 warm-up steps of both); the mean
ms/token of a range is given with its median in brackets (a spike from other work on the
machine moves the mean, hardly the median), the ratio from the means. Cache sizes are read after
the range's last step: ours from `KVCache.nbytes` (local layers keep a ring of `window` slots;
global layers are allocated for the whole sequence at prefill), theirs the sum of the key and
value tensors in its DynamicCache (every layer grows by one position per step).

Runtime on 2 cores: the default (125m) about 6-7 minutes when the machine is otherwise idle
(`--repeats 1` saves about a minute and a half), `--quick --model tiny` about half a minute.
The machine's other work shows in the numbers: on a small, shared CPU run it alone and more
than once before trusting a ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from importlib.metadata import version

import torch
from markdown_table import markdown

from train.checkpoints.hf import config_from_hf, state_dict_from_hf
from train.checkpoints.load import model_from_state
from train.config.evaluation import GenerationConfig
from train.model.decoding import generate_ids

VOCAB = 50257
EOS = VOCAB - 1
CONTEXT = 2048 + 256
SHAPES = {
    "125m": dict(hidden_size=768, num_layers=12, num_heads=12, window_size=256),
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, window_size=64),
}
BATCH_LENGTHS = [8, 11, 15, 18, 22, 25, 29, 32]  # batch 8, prompts of 8..32 tokens
SHORT = 16


def build(shape: dict, kinds: list) -> tuple:
    """(Hugging Face model, ours) holding the same random weights."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=VOCAB,
        max_position_embeddings=CONTEXT,
        attention_types=kinds,
        bos_token_id=EOS,
        eos_token_id=EOS,
        attn_implementation="eager",
        **shape,
    )
    hf = GPTNeoForCausalLM(config).eval()
    ours = model_from_state(
        config_from_hf(hf.config.to_dict(), "bench"), state_dict_from_hf(hf.state_dict(), "bench")
    ).eval()
    return hf, ours


def prompts_of(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, EOS, (n,), generator=g).tolist() for n in lengths]


def hf_generate(hf, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Left-padded batch; the new tokens of each row up to and including its end-of-text."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), EOS, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    out = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        num_beams=1,
        pad_token_id=EOS,
        eos_token_id=EOS,
    )
    rows = []
    for row in out[:, T:].tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


def neo_generate(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=new, do_sample=False)
    return [g[0].token_ids for g in generate_ids(model, prompts, config, eos_id=EOS)]


def hf_prefill(hf, prompt: list[int]) -> None:
    hf(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)


def neo_prefill(model, prompt: list[int], new: int) -> None:
    model.prefill(torch.tensor([prompt]), torch.tensor([len(prompt)]), len(prompt) + new)


def best_time(fns: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Best wall time of each function over `repeats` (taking turns) and its last result."""
    best, results = dict.fromkeys(fns, float("inf")), {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def check(hf_rows: list[list[int]], neo_rows: list[list[int]], new: int) -> str:
    same = sum(a == b for a, b in zip(hf_rows, neo_rows, strict=True))
    short = [
        f"{who} row {i}: {len(r)}"
        for who, rows in (("HF", hf_rows), ("neo", neo_rows))
        for i, r in enumerate(rows)
        if len(r) != new
    ]
    text = f"{same}/{len(hf_rows)} rows"
    return text + (f"; SHORT (end-of-text) {', '.join(short)}" if short else "")


def generation_table(hf, ours, args, new: int) -> None:
    cases = [
        (f"batch 1, {SHORT}-token prompt", prompts_of([SHORT], 1)),
        ("batch 8, prompts of 8..32 tokens", prompts_of(BATCH_LENGTHS, 2)),
        (f"batch 1, {args.long_prompt}-token prompt", prompts_of([args.long_prompt], 3)),
    ]
    # warm-up: both generators on every shape, a few tokens
    for _, prompts in cases:
        hf_generate(hf, prompts, 4)
        neo_generate(ours, prompts, 4)
    header = [
        "case",
        "new tokens/row",
        "HF tokens/s",
        "neo tokens/s",
        "neo / HF",
        "HF prefill s",
        "neo prefill s",
        "neo / HF prefill",
        "same tokens",
    ]
    rows = []
    for case, (label, prompts) in enumerate(cases):
        t, out = best_time(
            {
                "hf": lambda p=prompts: hf_generate(hf, p, new),
                "neo": lambda p=prompts: neo_generate(ours, p, new),
            },
            args.repeats,
        )
        hf_tps = sum(map(len, out["hf"])) / t["hf"]
        neo_tps = sum(map(len, out["neo"])) / t["neo"]
        prefill = ["-", "-", "-"]
        if case == 2:  # the long prompt
            p, _ = best_time(
                {
                    "hf": lambda p=prompts[0]: hf_prefill(hf, p),
                    "neo": lambda p=prompts[0]: neo_prefill(ours, p, new),
                },
                args.repeats,
            )
            prefill = [f"{p['hf']:.3f}", f"{p['neo']:.3f}", f"{p['hf'] / p['neo']:.2f}x"]
        rows.append(
            [
                label,
                str(new),
                f"{hf_tps:.1f}",
                f"{neo_tps:.1f}",
                f"{neo_tps / hf_tps:.2f}x",
                *prefill,
                check(out["hf"], out["neo"], new),
            ]
        )
    print(
        f"\n### Greedy generation, {args.model} shape ({describe(ours)}), fp32, "
        f"{torch.get_num_threads()} threads: best of {args.repeats} after a warm-up\n"
    )
    markdown(header, rows)
    print(
        "\nneo / HF prefill is HF's prefill seconds over ours (higher: ours faster), as neo / HF "
        "tokens/s is; same tokens: rows whose new tokens are identical in both."
    )


class NeoSteps:
    """Our decoding loop, one step at a time: `GPT.prefill`, then `GPT.decode` fed its argmax."""

    def __init__(self, model, prompt: list[int], steps: int):
        ids, lengths = torch.tensor([prompt]), torch.tensor([len(prompt)])
        logits, self.cache = model.prefill(ids, lengths, len(prompt) + steps)
        self.model, self.token, self.tokens = model, logits.argmax(-1), []

    def step(self) -> None:
        self.tokens.append(int(self.token))
        self.token = self.model.decode(self.token, self.cache).argmax(-1)

    def nbytes(self) -> tuple[int, int]:
        """(local layers, all layers)"""
        local = self.cache.nbytes("local")
        return local, local + self.cache.nbytes("global")


class HFSteps:
    """Hugging Face's model stepped the same way over its DynamicCache."""

    def __init__(self, hf, prompt: list[int], steps: int):
        out = hf(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        self.hf, self.cache, self.position = hf, out.cache, len(prompt)
        self.token, self.tokens = out.logits[:, -1].argmax(-1), []
        self.local = [i for i, k in enumerate(hf.config.attention_layers) if k == "local"]

    def step(self) -> None:
        self.tokens.append(int(self.token))
        out = self.hf(
            self.token[:, None],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
            position_ids=torch.tensor([[self.position]]),
        )
        self.cache, self.position = out.cache, self.position + 1
        self.token = out.logits[:, -1].argmax(-1)

    def nbytes(self) -> tuple[int, int]:
        sizes = [layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers]
        return sum(sizes[i] for i in self.local), sum(sizes)


def lockstep(loops: dict, steps: int, marks: list[int]) -> tuple[dict, dict]:
    """Seconds of every step of each loop (the loops take turns step by step, so a busy phase
    of the machine hits both) and each loop's cache sizes after step `mark` - 1."""
    times = {name: [] for name in loops}
    sizes = {name: {} for name in loops}
    for i in range(steps):
        for name, loop in loops.items():
            start = time.perf_counter()
            loop.step()
            times[name].append(time.perf_counter() - start)
            if i + 1 in marks:
                sizes[name][i + 1] = loop.nbytes()
    return times, sizes


def decode_table(shape: dict, args) -> None:
    n = args.decode_tokens
    marks = [n // 6, n // 3, 2 * n // 3, n]
    prompt = prompts_of([SHORT], 4)[0]
    header = [
        "layers",
        "generated positions",
        "HF ms/token (median)",
        "neo ms/token (median)",
        "neo / HF (means)",
        "HF cache MiB, local layers",
        "neo cache MiB, local layers",
        "HF cache MiB, all",
        "neo cache MiB, all",
    ]
    rows, notes = [], []
    window = shape["window_size"]
    for label, kinds in (
        (f"all local (window {window})", [[["local"], shape["num_layers"]]]),
        ("global/local alternating", [[["global", "local"], shape["num_layers"] // 2]]),
    ):
        hf, ours = build(shape, kinds)
        with torch.inference_mode():
            lockstep({"hf": HFSteps(hf, prompt, 8), "neo": NeoSteps(ours, prompt, 8)}, 8, [])
            loops = {"hf": HFSteps(hf, prompt, n), "neo": NeoSteps(ours, prompt, n)}
            times, sizes = lockstep(loops, n, marks)
        ids_hf, ids_neo = loops["hf"].tokens, loops["neo"].tokens
        same = next(
            (i for i, (a, b) in enumerate(zip(ids_hf, ids_neo, strict=True)) if a != b), None
        )
        notes.append(
            f"{label}: generated ids "
            + ("identical" if same is None else f"differ from generated position {same}")
            + (f"; end-of-text at HF position {ids_hf.index(EOS)}" if EOS in ids_hf else "")
            + (f"; end-of-text at neo position {ids_neo.index(EOS)}" if EOS in ids_neo else "")
        )
        lo = 0
        for hi in marks:
            hf_ms, neo_ms = (1000 * statistics.mean(times[k][lo:hi]) for k in ("hf", "neo"))
            hf_med, neo_med = (1000 * statistics.median(times[k][lo:hi]) for k in ("hf", "neo"))
            (hf_local, hf_all), (neo_local, neo_all) = sizes["hf"][hi], sizes["neo"][hi]
            rows.append(
                [
                    label,
                    f"[{lo}, {hi})",
                    f"{hf_ms:.2f} ({hf_med:.2f})",
                    f"{neo_ms:.2f} ({neo_med:.2f})",
                    f"{hf_ms / neo_ms:.2f}x",
                    mib(hf_local),
                    mib(neo_local),
                    mib(hf_all),
                    mib(neo_all),
                ]
            )
            lo = hi
        del hf, ours
    print(
        f"\n### Decode time per token vs generated length, {args.model} shape, batch 1, "
        f"{SHORT}-token prompt, {n} decode steps, fp32, {torch.get_num_threads()} threads: mean "
        "(median) of each range's steps, one run, the two loops taking turns step by step\n"
    )
    markdown(header, rows)
    print(
        "\nneo / HF is HF's mean ms/token over ours (higher: ours faster). Cache sizes after "
        "the range's last step."
    )
    for note in notes:
        print(f"- {note}")


def describe(model) -> str:
    c = model.config
    kinds = "/".join(dict.fromkeys(c.layer_kinds()))
    return (
        f"hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} heads, {kinds}, "
        f"window {c.window_size}, {model.num_parameters() / 1e6:.0f}M parameters"
    )


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="125m")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 32 new tokens, 256-token long prompt, 1 repeat, 384 decode steps",
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-decode", action="store_true", help="table 1 only")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.long_prompt, args.repeats, args.decode_tokens = 32, 256, 1, 384
    if args.long_prompt + args.new_tokens > CONTEXT or SHORT + args.decode_tokens > CONTEXT:
        parser.error(f"prompt + new tokens must fit max_position_embeddings={CONTEXT}")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {version('transformers')}, CPU fp32")

    shape = SHAPES[args.model]
    hf, ours = build(shape, [[["global", "local"], shape["num_layers"] // 2]])
    with torch.inference_mode():
        generation_table(hf, ours, args, args.new_tokens)
    del hf, ours
    if not args.skip_decode:
        decode_table(shape, args)


if __name__ == "__main__":
    main()
