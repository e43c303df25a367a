"""Beam search over the model's KV cache: Hugging Face's vectorised `_beam_search`, step for
step (the same hypotheses, scores and tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.model.sampling import Generated, Processors, Rows, _seen

NEG = -1.0e9


def beam_search(
    rows: Rows, config, max_new, eos_id, generator, stop, batch
) -> list[list[Generated]]:
    nb = config.num_beams
    keep = 2 * nb  # max(2, 1 + number of eos tokens) * num_beams: one eos token here
    processors = Processors(config, min_tokens_to_keep=2)
    dev = rows.device
    lp, early = config.length_penalty, config.early_stopping
    top_mask = torch.arange(keep, device=dev) < nb

    def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        while index.dim() < t.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(t, index, dim=1)

    run_seq = torch.full((batch, nb, max_new), eos_id, dtype=torch.long, device=dev)
    run_logp = torch.zeros(batch, nb, max_new, device=dev)  # raw log-probabilities
    run_scores = torch.zeros(batch, nb, device=dev)
    run_scores[:, 1:] = NEG
    fin_seq, fin_logp = run_seq.clone(), run_logp.clone()
    fin_scores = torch.full((batch, nb), NEG, device=dev)
    fin_done = torch.zeros(batch, nb, dtype=torch.bool, device=dev)
    fin_len = torch.zeros(batch, nb, dtype=torch.long, device=dev)
    fin_stop = torch.zeros(batch, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=dev)

    logits = rows.start()
    vocab = logits.shape[-1]
    seen = _seen(rows, vocab) if processors.needs_seen else None
    for step in range(max_new):
        raw = F.log_softmax(logits.float(), dim=-1)
        scores = processors(raw, seen).view(batch, nb, vocab) + run_scores[:, :, None]
        flat = scores.view(batch, nb * vocab)
        if config.do_sample:
            index = torch.multinomial(F.softmax(flat, dim=-1), keep, generator=generator)
            values = flat.gather(1, index)
            values, order = values.sort(dim=-1, descending=True)
            index = index.gather(1, order)
        else:
            values, index = torch.topk(flat, keep)
        beam, token = index // vocab, index % vocab
        cand_seq = take(run_seq, beam)
        cand_seq[:, :, step] = token
        cand_logp = take(run_logp, beam)
        cand_logp[:, :, step] = raw.view(batch, nb * vocab).gather(1, index)
        hits = (token == eos_id) | (step + 1 >= max_new)
        stopped = torch.zeros_like(hits)
        if stop is not None:
            for b in range(batch):
                for k in range(keep):
                    ids = rows.ids(b * nb + int(beam[b, k])) + [int(token[b, k])]
                    stopped[b, k] = token[b, k] != eos_id and stop.hit(ids)
            hits |= stopped

        # the best `nb` continuations that did not finish go on
        run_values = values + hits.float() * NEG
        chosen = torch.topk(run_values, nb).indices
        run_seq, run_logp = take(cand_seq, chosen), take(cand_logp, chosen)
        run_scores = take(run_values, chosen)
        source = take(beam, chosen) + torch.arange(batch, device=dev)[:, None] * nb

        # finished candidates among the top `nb` join the finished hypotheses if they are better
        just = hits & top_mask[None, :]
        final = values / ((step + 1) ** lp)
        full = fin_done.all(dim=-1, keepdim=True) & (early is True)
        final = final + full.float() * NEG + (~improvable).float() * NEG + (~just).float() * NEG
        merged = torch.topk(torch.cat((fin_scores, final), dim=1), nb).indices
        fin_seq = take(torch.cat((fin_seq, cand_seq), dim=1), merged)
        fin_logp = take(torch.cat((fin_logp, cand_logp), dim=1), merged)
        fin_scores = take(torch.cat((fin_scores, final), dim=1), merged)
        fin_done = take(torch.cat((fin_done, just), dim=1), merged)
        new_len = torch.full_like(token, step + 1)
        fin_len = take(torch.cat((fin_len, new_len), dim=1), merged)
        fin_stop = take(torch.cat((fin_stop, stopped), dim=1), merged)

        # can the running beams still beat the worst finished one?
        best_length = max_new if early == "never" and lp > 0.0 else step + 1
        best_possible = run_scores[:, :1] / (best_length**lp)
        worst = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, NEG)
        improvable = improvable & (best_possible > worst).any(dim=-1, keepdim=True)
        if not (
            bool(improvable.any())
            and not (bool(fin_done.all()) and early is True)
            and not bool(hits.all())
        ):
            break
        order = source.flatten()
        rows.reorder(order)
        if seen is not None:
            seen = seen.index_select(0, order)
            seen[torch.arange(len(rows), device=dev), run_seq[:, :, step].flatten()] = True
        logits = rows.step(run_seq[:, :, step].flatten())

    results = []
    for b in range(batch):
        best = []
        for i in range(config.num_return_sequences):
            n = int(fin_len[b, i])
            ids = fin_seq[b, i, :n].tolist()
            reason = "eos" if ids and ids[-1] == eos_id else "stop" if fin_stop[b, i] else "length"
            best.append(
                Generated(ids, fin_logp[b, i, :n].tolist(), reason, float(fin_scores[b, i]))
            )
        results.append(best)
    return results
