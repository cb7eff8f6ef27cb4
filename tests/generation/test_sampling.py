"""Group sampling with a real (tiny) Llama: layout, EOS/pad masking, and log-prob consistency
between generation and the loss's forward pass under left padding."""

import math

import pytest
import torch

from helpers import EOS, PAD, PROMPTS, assert_draws_follow, build_tiny_llama, byte_tokenizer
from zenalign.grpo.logprobs import completion_logprobs
from zenalign.recipe.schema import SamplingSection
from zenalign.grpo import gumbel
from zenalign.grpo.gumbel import ROW_BLOCK, GumbelSampler, completion_keys, uniform
from zenalign.grpo.rollout import completion_mask_from, decode_without_special_tokens, generate_groups, generation_config, neutral_generation_defaults


def test_completion_mask_stops_after_first_eos():
    tokens = torch.tensor([[5, 6, EOS, PAD], [5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, 9, EOS, 9]])
    mask, truncated = completion_mask_from(tokens, [EOS])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]
    # several EOS ids (e.g. <|eot_id|> and <|end_of_text|>) all end a completion
    mask, _ = completion_mask_from(torch.tensor([[5, 7, 6, 1]]), [1, 7])
    assert mask.tolist() == [[1, 1, 0, 0]]


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama(seed=3).eval()


def test_groups_are_contiguous_and_masked(model):
    tokenizer = byte_tokenizer()
    sampling = SamplingSection(group_size=3, max_new_tokens=6)
    keys = completion_keys(seed=0, step=1, first_completion=0, count=9)
    rollout = generate_groups(model, tokenizer, PROMPTS, sampling, [EOS], group_size=3, keys=keys)
    n = len(PROMPTS) * 3
    assert rollout.sequences.shape[0] == n and len(rollout.completions) == n
    encoded = tokenizer(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    for p in range(len(PROMPTS)):
        for i in range(p * 3, p * 3 + 3):  # rows g*G .. g*G+G-1 answer prompt g
            assert rollout.sequences[i, : rollout.prompt_length].tolist() == encoded["input_ids"][p].tolist()
    tokens = rollout.completion_tokens
    for i in range(n):
        length = int(rollout.completion_mask[i].sum())
        real = tokens[i, :length].tolist()
        if rollout.truncated[i]:
            assert EOS not in real and len(rollout.completion_ids[i]) == length
        else:
            assert real[-1] == EOS and EOS not in real[:-1]
            assert rollout.completion_ids[i] == real[:-1]
        assert rollout.completions[i] == tokenizer.decode(rollout.completion_ids[i], skip_special_tokens=True)
        # padding after EOS is masked out of attention too
        assert rollout.attention_mask[i, rollout.prompt_length:].tolist() == rollout.completion_mask[i].tolist()
    # left padding: the shortest prompt's pad columns are masked
    assert rollout.attention_mask[3, : rollout.prompt_length].sum() == len("hi")


def test_loss_logprobs_equal_the_sampled_distribution(model):
    """log pi recomputed for the loss == log_softmax(logits / T) of the logits generate sampled
    from, for left-padded prompts of different lengths (positions must follow the mask)."""
    from transformers import LogitsProcessorList

    tokenizer = byte_tokenizer()
    sampling = SamplingSection(group_size=2, max_new_tokens=5, temperature=0.7)
    encoded = tokenizer(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    input_ids = encoded["input_ids"].repeat_interleave(2, 0)
    prompt_mask = encoded["attention_mask"].repeat_interleave(2, 0)
    keys = completion_keys(seed=0, step=1, first_completion=0, count=input_ids.shape[0])
    config = generation_config(sampling, [EOS], PAD)
    config.update(output_logits=True, return_dict_in_generate=True)
    sampler = GumbelSampler(keys, input_ids.shape[1], temperature=0.7)
    with neutral_generation_defaults(model):
        out = model.generate(input_ids=input_ids, attention_mask=prompt_mask, generation_config=config,
                             logits_processor=LogitsProcessorList([sampler]))
    raw = torch.stack(out.logits, dim=1).float() / 0.7  # (N, Tc, V)
    prompt_length = input_ids.shape[1]
    tokens = out.sequences[:, prompt_length:]
    expected = torch.log_softmax(raw, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    mask, _ = completion_mask_from(tokens, [EOS])
    attention = torch.cat([prompt_mask, mask], dim=1)
    got = completion_logprobs(model, out.sequences, attention, prompt_length, temperature=0.7)
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)


def test_model_generation_config_does_not_leak_into_sampling():
    """A model whose generation_config asks for top_k=3, repetition_penalty=5 and temperature 0.3
    must still be decoded from its plain logits (the Gumbel sampler then adds exactly the
    recipe's temperature and noise), or the policy gradient would be for another distribution."""
    model = build_tiny_llama(seed=4).eval()
    model.generation_config.top_k = 3
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.temperature = 0.3
    model.generation_config.do_sample = True
    tokenizer = byte_tokenizer()
    sampling = SamplingSection(max_new_tokens=4, temperature=1.0)
    encoded = tokenizer(PROMPTS[:1], add_special_tokens=False, return_tensors="pt")
    config = generation_config(sampling, [EOS], PAD)
    config.update(output_logits=True, output_scores=True, return_dict_in_generate=True)
    with neutral_generation_defaults(model):
        out = model.generate(**encoded, generation_config=config)
    assert model.generation_config.repetition_penalty == 5.0  # restored afterwards
    for raw, processed in zip(out.logits, out.scores):
        assert torch.isfinite(processed).all()  # no top-k masking
        assert torch.allclose(torch.log_softmax(processed, -1), torch.log_softmax(raw, -1), atol=1e-5)


def test_greedy_is_deterministic(model):
    tokenizer = byte_tokenizer()
    sampling = SamplingSection(max_new_tokens=6)
    first = generate_groups(model, tokenizer, PROMPTS, sampling, [EOS], group_size=1)
    torch.manual_seed(123)
    second = generate_groups(model, tokenizer, PROMPTS, sampling, [EOS], group_size=1)
    assert first.completions == second.completions


# ---------------------------------------------------------------------------------------- Gumbel-max

def test_gumbel_sampler_draws_from_softmax_over_temperature():
    # 40,000 draws from one row of logits: the frequencies match softmax(logits / T)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]])
    for temperature, top_k in ((1.0, 0), (0.5, 0), (1.0, 2)):
        keys = completion_keys(seed=3, step=7, first_completion=0, count=40_000)
        sampler = GumbelSampler(keys, prompt_length=0, temperature=temperature, top_k=top_k)
        draws = sampler(torch.zeros(40_000, 0, dtype=torch.long), logits.expand(40_000, -1)).argmax(-1)
        freq = torch.bincount(draws, minlength=5).double() / 40_000
        scaled = logits[0].double() / temperature
        if top_k:
            scaled[scaled < scaled.topk(top_k).values[-1]] = -float("inf")
        expected = torch.softmax(scaled, -1)
        assert torch.allclose(freq, expected, atol=0.01), (temperature, top_k, freq, expected)


@pytest.mark.parametrize("case", ["flat tail", "peaked", "top-k inside the candidates", "top-p", "temperature"])
def test_candidates_and_tail_draw_from_softmax(case):
    """The large-vocabulary path (forced here on 300 ids, 8 candidates): the candidates' own
    noise plus one draw for the tail atom, and the inverse CDF inside the tail when it wins, is an
    exact sample: 20,000 draws pass a chi-square test against softmax(logits / T) with the
    warpers, in cases where the tail holds most of the mass and where it holds almost none."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 300, generator=generator) * (0.5 if case == "flat tail" else 4.0)
    temperature, top_k, top_p = {"top-k inside the candidates": (1.0, 5, 1.0), "top-p": (1.0, 0, 0.9),
                                 "temperature": (0.6, 0, 1.0)}.get(case, (1.0, 0, 1.0))
    n = 20_000
    keys = completion_keys(seed=11, step=3, first_completion=0, count=n)
    sampler = GumbelSampler(keys, prompt_length=0, temperature=temperature, top_k=top_k, top_p=top_p,
                            candidates=8, full_vocab=0)
    out = sampler(torch.zeros(n, 2, dtype=torch.long), logits.expand(n, -1))
    draws = out.argmax(-1)
    assert torch.equal(out.isfinite().sum(-1), torch.ones(n, dtype=torch.long))  # one token per row
    assert torch.equal(sampler.choose(torch.zeros(n, 2, dtype=torch.long), logits.expand(n, -1)), draws)
    scaled = logits / temperature
    for warper in ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else []):
        scaled = warper(None, scaled)
    assert_draws_follow(draws, torch.softmax(scaled[0].double(), -1))


@pytest.mark.parametrize("spread", [0.05, 3.0], ids=["every-row-opens-the-tail", "some-rows-do"])
def test_a_vocabulary_of_whole_tail_blocks_draws_from_softmax_and_choose_picks_the_same(spread):
    """At 2,048 ids (two whole tail blocks, so nothing is padded) the large-vocabulary path still
    passes the chi-square test, and ``choose`` returns the argmax of the scores ``__call__`` builds,
    whether every row needs the tail's sum (flat logits) or only some rows do."""
    generator = torch.Generator().manual_seed(8)
    n, vocab = 20_000, 2048
    logits = torch.randn(n, vocab, generator=generator) * spread
    logits[:, :4] += torch.tensor([6.0, 5.0, 4.0, 3.0]) * spread
    keys = completion_keys(seed=2, step=5, first_completion=0, count=n)
    sampler = GumbelSampler(keys, prompt_length=0, temperature=1.0, candidates=8, full_vocab=0)
    ids = torch.zeros(n, 1, dtype=torch.long)
    draws = sampler.choose(ids, logits)
    assert torch.equal(draws, sampler(ids, logits).argmax(-1))
    one_row = torch.stack([GumbelSampler(keys[i:i + 1], 0, 1.0, candidates=8, full_vocab=0).choose(
        ids[i:i + 1], logits[i:i + 1])[0] for i in range(0, n, 997)])
    assert torch.equal(one_row, draws[::997])  # a row alone draws what it draws in the batch
    row_logits = logits[0]
    repeated = GumbelSampler(keys, 0, 1.0, candidates=8, full_vocab=0).choose(ids, row_logits.expand(n, -1))
    assert_draws_follow(repeated, torch.softmax(row_logits.double(), -1))


def test_the_decoding_loop_lets_the_sampler_choose_and_runs_other_processors_first():
    """sample_loop hands the scores, after the processors before it, to the keyed sampler's
    ``choose`` instead of an argmax over built scores; the ids are the same as the argmax's."""
    from zenalign.models.primitives import sample_loop

    generator = torch.Generator().manual_seed(4)
    vocab, rows, steps = 5000, 6, 5
    table = torch.randn(steps, rows, vocab, generator=generator)
    keys = completion_keys(seed=3, step=1, first_completion=0, count=rows)
    calls = []

    class Counting(GumbelSampler):
        def choose(self, input_ids, scores):
            calls.append(float(scores[0, 7]))
            return super().choose(input_ids, scores)

    def bump(input_ids, scores):  # an ordinary processor before the sampler
        return scores.index_fill(1, torch.tensor([7]), 50.0 + input_ids.shape[1])

    def run(processors):
        state = {"step": 0}

        def step_logits(previous):
            state["step"] += 1
            return table[state["step"]]

        return sample_loop(torch.zeros(rows, 2, dtype=torch.long), table[0], step_logits, steps,
                           torch.tensor([-1]), 0, processors)

    chosen = run([bump, Counting(keys, 2, 1.0)])
    assert calls == [52.0, 53.0, 54.0, 55.0, 56.0]  # called each step, after the other processor
    sampler = GumbelSampler(keys, 2, 1.0)
    built = run(lambda input_ids, scores: sampler(input_ids, bump(input_ids, scores)))  # a bare callable: argmax
    assert torch.equal(chosen, built) and bool((chosen[:, 2:] == 7).all())


def test_the_draw_inside_the_tail_is_the_inverse_cdf_by_hand(monkeypatch):
    """Blocks of 4 ids, weights [1 0 2 1 | 0 4 0 0] (total 8, so the id CDF is 1 1 3 4 4 8 8 8):
    the drawn id is the first whose CDF exceeds u * 8, in every row of one batch; and a u that
    rounds up to the total lands on the last id with weight, never on a weightless one."""
    monkeypatch.setattr(gumbel, "TAIL_BLOCK", 4)
    blocks = torch.tensor([[1.0, 0.0, 2.0, 1.0], [0.0, 4.0, 0.0, 0.0]]).expand(6, -1, -1)
    u = torch.tensor([0.1, 0.3, 0.49, 0.5, 0.999, 1.0], dtype=torch.float64)  # targets 0.8 2.4 3.92 4 7.99 8
    assert gumbel._inverse_cdf(blocks, blocks.sum(-1).double(), u, torch.arange(6)).tolist() == [0, 2, 3, 5, 5, 5]
    empty_end = torch.tensor([[[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])  # target 3 = the total
    assert gumbel._inverse_cdf(empty_end, empty_end.sum(-1).double(), torch.tensor([1.0], dtype=torch.float64),
                               torch.tensor([0])).tolist() == [1]


def test_the_draw_inside_the_tail_equals_the_row_by_row_search():
    """The batched inverse CDF against the search written out one row at a time (two searchsorted
    calls per row, as the sampler first did it): the same ids for 300 rows over 5 blocks, with
    zero weights (candidates, padding, a whole empty block) among them."""
    generator = torch.Generator().manual_seed(4)
    w, nb, tb = 300, 5, gumbel.TAIL_BLOCK
    blocks = torch.rand(w, nb, tb, generator=generator) * (torch.rand(w, nb, tb, generator=generator) > 0.3)
    blocks[:, 2] = 0.0                       # a block with no weight
    blocks[:, -1, tb // 2 :] = 0.0           # the padding of a partial last block
    block_sums = blocks.sum(-1).double()
    u = torch.rand(w, generator=generator, dtype=torch.float64)
    expected = []
    for i in range(w):
        cumulative = block_sums[i].cumsum(0)
        target = float(u[i]) * float(cumulative[-1])
        b = min(int(torch.searchsorted(cumulative, target, right=True)), nb - 1)
        inside = blocks[i, b].double().cumsum(0)
        last = int(torch.nonzero(blocks[i, b]).max())
        before = float(cumulative[b - 1]) if b else 0.0
        expected.append(b * tb + min(int(torch.searchsorted(inside, target - before, right=True)), last))
    drawn = gumbel._inverse_cdf(blocks, block_sums, u, torch.arange(w))
    assert drawn.tolist() == expected
    assert bool((blocks.view(w, -1).gather(1, drawn[:, None]) > 0).all())  # never a weightless id
    assert gumbel._inverse_cdf(blocks[7:8], block_sums[7:8], u[7:8], torch.tensor([0])).tolist() == expected[7:8]
    some = torch.tensor([250, 3, 41])  # rows picked out of the batch: each reads its own weights
    assert gumbel._inverse_cdf(blocks, block_sums, u[some], some).tolist() == [expected[i] for i in some.tolist()]


def test_the_tail_atom_and_the_full_draw_agree_where_the_tail_cannot_win():
    """Over a vocabulary where the candidates hold all but a sliver of the mass, the two paths draw
    the same token in (nearly) every row: the candidates' noise is the full draw's."""
    logits = torch.full((1, 600), -30.0)
    logits[0, :40] = torch.linspace(0.0, 3.0, 40)
    keys = completion_keys(seed=1, step=1, first_completion=0, count=5_000)
    ids = torch.zeros(5_000, 1, dtype=torch.long)
    full = GumbelSampler(keys, 0, 1.0)(ids, logits.expand(5_000, -1)).argmax(-1)
    split = GumbelSampler(keys, 0, 1.0, candidates=64, full_vocab=0)(ids, logits.expand(5_000, -1)).argmax(-1)
    assert (full == split).float().mean() > 0.999


def test_uniform_noise_is_uniform_and_keyed():
    u = uniform(torch.arange(2000), position=3, vocab_size=50)
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert torch.equal(u, uniform(torch.arange(2000), position=3, vocab_size=50))  # a pure function
    assert not torch.equal(u, uniform(torch.arange(2000), position=4, vocab_size=50))


def test_uniform_noise_is_the_splitmix64_hash_written_out():
    """Bit for bit what the module docstring says, computed with Python integers: a sampler that
    keeps the token and row hashes between steps, and the in-place hash, draw the same numbers."""
    mask = (1 << 64) - 1

    def mix(x):
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    keys = completion_keys(seed=2, step=9, first_completion=5, count=3)
    sampler = GumbelSampler(keys, prompt_length=4, temperature=1.0)
    scores = torch.zeros(3, 40)
    for position in (0, 3, ROW_BLOCK + 6, 1):  # past the first block of row hashes, and back
        u = uniform(keys, position, 40)
        gumbel = sampler(torch.zeros(3, 4 + position, dtype=torch.long), scores)  # the hashes kept after the first call
        for row, key in enumerate(keys.tolist()):
            for token in (0, 17, 39):
                bits = mix((mix(((key & mask) * 1_000_003 + position) & mask) ^ mix(token)) & mask)
                expected = ((bits >> 11) + 0.5) / 2.0 ** 53
                assert u[row, token].item() == expected
                assert gumbel[row, token].item() == pytest.approx(-math.log(-math.log(expected)), rel=1e-6)


def _rows_with_special_ids(tokenizer):
    """Completions as the sampler returns them, with special ids among the text: padding, EOS,
    unknown and extra ids, in front of, inside and after UTF-8 text (some of it multi-byte)."""
    special = sorted(tokenizer.all_special_ids)
    texts = ["olleh", "déjà vu", "日本", "", "a b  c"]
    rows = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        middle = len(ids) // 2
        rows.append([special[i % len(special)]] + ids[:middle] + [special[-1 - i]] + ids[middle:] + [EOS, PAD])
    return rows


def test_decoding_completions_equals_batch_decode_skipping_special_tokens():
    """The byte tokenizer (a transformers Python tokenizer) takes the path that drops the special
    ids once; what it returns is what batch_decode(skip_special_tokens=True) returns."""
    from zenalign.grpo.rollout import _skips_special_ids_by_filtering

    tokenizer = byte_tokenizer()
    rows = _rows_with_special_ids(tokenizer)
    assert _skips_special_ids_by_filtering(type(tokenizer))
    expected = tokenizer.batch_decode(rows, skip_special_tokens=True)
    assert expected[1] == "déjà vu" and expected[2] == "日本"  # the special ids really were in the way
    assert decode_without_special_tokens(tokenizer, rows) == expected
    assert decode_without_special_tokens(tokenizer, rows) != tokenizer.batch_decode(rows)


def test_tokenizers_that_decode_their_own_way_are_called_as_usual():
    """A Python tokenizer class that overrides its decoding, and a Rust-backed tokenizer, get
    batch_decode(skip_special_tokens=True) itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

    from zenalign.grpo.rollout import _skips_special_ids_by_filtering

    class Shouting(ByT5Tokenizer):
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super()._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).upper()

    assert not _skips_special_ids_by_filtering(Shouting)
    shouting = Shouting()
    rows = _rows_with_special_ids(shouting)
    assert decode_without_special_tokens(shouting, rows) == shouting.batch_decode(rows, skip_special_tokens=True)
    assert decode_without_special_tokens(shouting, rows)[0] == "OLLEH"

    vocab = {"<pad>": 0, "</s>": 1, "hello": 2, "world": 3, "<extra>": 4}
    rust = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=rust, pad_token="<pad>", eos_token="</s>",
                                   additional_special_tokens=["<extra>"])
    assert not _skips_special_ids_by_filtering(type(fast))
    rows = [[4, 2, 1, 0], [3, 4, 2]]
    assert decode_without_special_tokens(fast, rows) == fast.batch_decode(rows, skip_special_tokens=True)


def test_sampling_does_not_depend_on_the_batch(model):
    """A completion depends on its key only: alone, or in a batch with other (longer) prompts,
    whatever the global RNG state, it comes out the same. This is what makes a 2-process run
    sample what a 1-process run samples, and a resumed run what an uninterrupted one would."""
    tokenizer = byte_tokenizer()
    sampling = SamplingSection(group_size=2, max_new_tokens=6)
    keys = completion_keys(seed=0, step=5, first_completion=0, count=6)
    together = generate_groups(model, tokenizer, PROMPTS, sampling, [EOS], group_size=2, keys=keys)
    torch.manual_seed(99)
    alone = generate_groups(model, tokenizer, PROMPTS[1:2], sampling, [EOS], group_size=2, keys=keys[2:4])
    assert alone.completions == together.completions[2:4]
    other = generate_groups(model, tokenizer, PROMPTS, sampling, [EOS], group_size=2,
                            keys=completion_keys(seed=1, step=5, first_completion=0, count=6))
    assert other.completions != together.completions


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (1e-6, 0, 1.0)])
def test_zenalign_decoder_samples_exactly_what_generate_samples(model, temperature, top_k, top_p):
    """The zenalign KV-cache loop is a rewrite of `generate` for this configuration: same tokens,
    same masks, on left-padded prompts of different lengths, with early EOS and truncation."""
    tokenizer = byte_tokenizer()
    keys = completion_keys(seed=0, step=2, first_completion=0, count=len(PROMPTS) * 4)
    rollouts = {}
    for decoder in ("generate", "zenalign"):
        sampling = SamplingSection(group_size=4, max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p,
                                   decoder=decoder)
        rollouts[decoder] = generate_groups(model, tokenizer, PROMPTS, sampling, [EOS], group_size=4, keys=keys)
    plain, own = rollouts["generate"], rollouts["zenalign"]
    assert torch.equal(own.sequences, plain.sequences) and torch.equal(own.attention_mask, plain.attention_mask)
    assert own.completions == plain.completions and torch.equal(own.truncated, plain.truncated)
    assert own.truncated.any() or temperature < 1e-3  # both kinds of ending occur at T = 1
    # greedy (no keys) too, as evaluation uses it
    greedy = {d: generate_groups(model, tokenizer, PROMPTS, SamplingSection(max_new_tokens=12, decoder=d), [EOS], group_size=1)
              for d in ("generate", "zenalign")}
    assert torch.equal(greedy["zenalign"].sequences, greedy["generate"].sequences)


def test_zenalign_decoder_output_can_be_differentiated_through(model):
    """Sampling runs under inference_mode; the rollout it returns must still feed a backward pass."""
    tokenizer = byte_tokenizer()
    rollout = generate_groups(model, tokenizer, PROMPTS, SamplingSection(max_new_tokens=5), [EOS], group_size=2,
                              keys=completion_keys(0, 1, 0, len(PROMPTS) * 2))
    logp = completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length)
    (logp * rollout.completion_mask).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("decoder", ["zenalign", "generate"])
def test_max_prompt_length_keeps_the_last_tokens_of_a_prompt(model, decoder):
    """TRL's max_prompt_length (sampling.max_prompt_length, long_prompts: truncate): a longer prompt
    keeps its last tokens. With byte tokens, the prompt "a much longer prompt than the others:" cut
    to 12 tokens is the text "the others:" plus the space before it; sampling from the truncated
    prompts gives exactly what sampling from those texts gives."""
    from zenalign.grpo.rollout import encode_prompts, rollout_from_rows

    tokenizer = byte_tokenizer()
    ids, mask = encode_prompts(tokenizer, PROMPTS, max_length=12)
    assert ids.shape == (3, 12)
    assert tokenizer.decode(ids[2]) == " the others:" and tokenizer.decode(ids[0]) == "reverse abc:"  # 12 bytes already
    assert mask.tolist()[1] == [0] * 10 + [1, 1]  # "hi", left-padded
    keys = completion_keys(seed=0, step=1, first_completion=0, count=6)
    cut = generate_groups(model, tokenizer, PROMPTS, SamplingSection(max_new_tokens=5, max_prompt_length=12, decoder=decoder),
                          [EOS], group_size=2, keys=keys)
    by_hand = [p[-12:] for p in PROMPTS]  # one byte is one token
    assert by_hand[2] == " the others:"
    same = generate_groups(model, tokenizer, by_hand, SamplingSection(max_new_tokens=5, decoder=decoder), [EOS],
                           group_size=2, keys=keys)
    assert cut.prompt_length == 12 and torch.equal(cut.sequences, same.sequences)
    assert cut.completions == same.completions
    whole = generate_groups(model, tokenizer, PROMPTS, SamplingSection(max_new_tokens=5, decoder=decoder), [EOS],
                            group_size=2, keys=keys)
    assert whole.prompt_length == len(PROMPTS[2])
    # groups joined from their token rows (dynamic sampling's later rounds) are truncated alike
    from zenalign.grpo.rollout import completion_rows

    rebuilt = rollout_from_rows(tokenizer, PROMPTS, completion_rows(cut), 2, [EOS], max_prompt_length=12)
    assert torch.equal(rebuilt.sequences, cut.sequences) and torch.equal(rebuilt.attention_mask, cut.attention_mask)
