"""Packed sequences (issue 16): documents packed into one row see only themselves, in every mixer.

A packed batch (position_ids that restart at 0, seq_idx, or cu_seq_lens_q as transformers' DataCollatorWithFlattening
writes them) must give, for every document, the logits and the gradients of that document run alone (float64, CPU,
every mixer kind); nothing may flow across a boundary; inputs that cannot be honoured raise a ValueError."""

import pytest
import torch

from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM
from llamathink.modeling_llamathink import packed_flex_attention, packed_sdpa, packed_segments

LENGTHS = ((7, 13, 4), (24,), (3, 1, 9, 11))  # rows of documents: short and long, a one-token one, row of one
T = 24


def _config(mixers=("linear", "csa", "full", "csa"), **overrides):
    # small chunk, window and stride so that every document crosses GDN chunks, CSA windows and CSA blocks
    values = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=len(mixers),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        linear_num_key_heads=1,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        max_position_embeddings=64,
        csa_window=8,
        csa_stride=4,
        gdn_chunk_size=8,
        mixer_types=list(mixers),
    )
    values.update(overrides)
    return LlamaThinkConfig(**values)


def _model(mixers=("linear", "csa", "full", "csa"), seed=0):
    torch.manual_seed(seed)
    model = LlamaThinkForCausalLM(_config(mixers)).double()
    with torch.no_grad():  # the zero-initialised scales and norms would hide mistakes: give every weight a value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _docs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 97, (n,), generator=g) for n in row] for row in LENGTHS]


def _packed(docs):
    ids = torch.stack([torch.cat(row) for row in docs])
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    return ids, pos


@pytest.mark.parametrize("mixers", [("linear",), ("csa",), ("full",), ("linear", "csa", "full", "csa")])
def test_a_packed_batch_equals_each_document_alone_logits_and_gradients(mixers):
    model = _model(mixers)
    docs = _docs()
    ids, pos = _packed(docs)
    weights = torch.randn(*ids.shape, 97, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    start_of = [0]
    for b, row in enumerate(docs):
        start = 0
        for d in row:
            alone = model(input_ids=d[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[b, start : start + len(d)], alone, rtol=1e-10, atol=1e-12)
            (alone * weights[b, start : start + len(d)]).sum().backward()
            start += len(d)
    del start_of
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_without_restarting_positions_the_documents_do_mix():
    """The control: the same rows as one stream each give other logits (the test above could not pass by accident)."""
    model = _model()
    ids, pos = _packed(_docs())
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    stream = model(input_ids=ids, use_cache=False).logits
    assert (packed[0, 7:] - stream[0, 7:]).abs().max() > 1e-3  # the second document of row 0 onwards
    torch.testing.assert_close(packed[0, :7], stream[0, :7])  # the first document has nothing before it


def test_transformers_flattening_collator_inputs_equal_separate_rows():
    """What TRL's padding_free / packing passes (transformers' DataCollatorWithFlattening: one row, position_ids
    restarting at 0; optionally seq_idx or flash-attention's cu_seq_lens_q) gives each example's own logits."""
    from transformers import DataCollatorWithFlattening

    model = _model()
    docs = [d for row in _docs() for d in row]
    features = [{"input_ids": d.tolist()} for d in docs]
    alone = torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])
    # the loss of the packed row: every document's own next-token losses, none across a boundary
    terms = [
        torch.nn.functional.cross_entropy(
            model(input_ids=d[None], use_cache=False).logits[0, :-1], d[1:], reduction="sum"
        )
        for d in docs
    ]
    expected_loss = sum(terms) / sum(len(d) - 1 for d in docs)
    both = {"return_seq_idx": True, "return_flash_attn_kwargs": True}
    for options in ({}, {"return_seq_idx": True}, {"return_flash_attn_kwargs": True}, both):
        batch = DataCollatorWithFlattening(return_tensors="pt", **options)(features)
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # all of it: cu_seq_lens_k, max_length_q, ...
        if options:  # the positions are derived from seq_idx / cu_seq_lens_q alone
            inputs.pop("position_ids")
        logits = model(**inputs, use_cache=False).logits
        torch.testing.assert_close(logits[0], alone, rtol=1e-10, atol=1e-12, msg=str(options))
        loss = model(**inputs, labels=batch["labels"], use_cache=False, skip_logits=True).loss
        torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-12, msg=str(options))


def test_nothing_crosses_a_boundary_and_each_document_stays_causal():
    """The regression of issue 16: with restarting position_ids, CSA cut its blocks by position across documents,
    so changing a later example moved an earlier position's logits. Now a change in one document moves no other
    document's logits, and within a document no earlier position's."""
    model = _model()
    docs = _docs()
    ids, pos = _packed(docs)
    base = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    for row, t in ((0, 9), (0, 20), (2, 4), (2, 15)):  # tokens inside later documents of packed rows
        changed = ids.clone()
        changed[row, t] = (changed[row, t] + 1) % 97
        out = model(input_ids=changed, position_ids=pos, use_cache=False).logits
        moved = (out - base).abs().amax(-1)[row] > 0
        start = t - int(pos[row, t])
        end = start + int((pos[row, start:] == torch.arange(T - start)).cumprod(0).sum())
        assert not moved[:t].any(), f"row {row}: changing token {t} moved earlier positions {moved[:t].nonzero()}"
        assert not moved[end:].any(), f"row {row}: changing token {t} moved later documents"
        assert moved[t:end].any()
        torch.testing.assert_close(out[1 - row if row < 2 else 1], base[1 - row if row < 2 else 1])


@pytest.mark.parametrize(
    "positions, message",
    [
        ([0, 1, 2, 3, 0, 1, 5, 6], "row 0, token 6 has position 5 where 0 was expected"),
        ([0, 1, 2, 3, 2, 3, 4, 5], "row 0, token 4 has position 2 where 0 was expected"),
        ([3, 4, 5, 0, 1, 2, 3, 4], "row 0, token 0 has position 3 where 0 was expected"),
    ],
)
def test_positions_that_are_not_a_clean_restart_pattern_are_refused(positions, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        model(input_ids=torch.randint(0, 97, (1, 8)), position_ids=torch.tensor([positions]), use_cache=False)


def test_packed_inputs_that_cannot_be_honoured_are_refused():
    model = _model().eval()
    ids = torch.randint(0, 97, (2, 8))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    with pytest.raises(ValueError, match="cannot be cached"):
        model(input_ids=ids, position_ids=pos, use_cache=True)
    out = model(input_ids=ids, position_ids=pos)  # eval mode's default use_cache: no cache, no error
    assert out.past_key_values is None
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="packed documents restart at 0 and take no cache or padding"):
        model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    with pytest.raises(ValueError, match="one flattened row, but the batch has 2 rows"):
        model(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 3, 8]), use_cache=False)
    with pytest.raises(ValueError, match="must rise from 0 to the sequence length 8"):
        model(input_ids=ids[:1], cu_seq_lens_q=torch.tensor([0, 3, 7]), use_cache=False)
    # fractions would be cut off into another packing (2.7 read as 2), as for position_ids
    with pytest.raises(ValueError, match=r"cu_seq_lens_q must be an integer tensor, got torch\.float32"):
        model(input_ids=ids[:1], cu_seq_lens_q=torch.tensor([0, 2.7, 8]), use_cache=False)
    with pytest.raises(ValueError, match=r"seq_idx must be an integer tensor, got torch\.float32"):
        model(input_ids=ids[:1], seq_idx=torch.tensor([[0, 0, 0.5, 0.5, 1, 1, 1, 1]]), use_cache=False)
    with pytest.raises(ValueError, match=r"seq_idx must be an integer tensor, got torch\.bool"):
        model(input_ids=ids[:1], seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]).bool(), use_cache=False)
    # flash-attention's other packing arguments must describe the same documents, never be ignored
    cu = torch.tensor([0, 3, 8])
    with pytest.raises(ValueError, match=r"cu_seq_lens_k \(\[0, 8\]\) must equal cu_seq_lens_q \(\[0, 3, 8\]\)"):
        model(input_ids=ids[:1], cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 8]), use_cache=False)
    with pytest.raises(ValueError, match="must equal cu_seq_lens_q \\(not given\\)"):
        model(input_ids=ids[:1], cu_seq_lens_k=cu, use_cache=False)
    for name in ("max_length_q", "max_length_k"):
        with pytest.raises(ValueError, match=f"{name}=8 is not the longest sequence of cu_seq_lens_q \\(5\\)"):
            model(input_ids=ids[:1], cu_seq_lens_q=cu, use_cache=False, **{name: 8})
    with pytest.raises(ValueError, match="must rise from 0 to the sequence length 8"):  # its own fault named first
        model(input_ids=ids[:1], cu_seq_lens_q=torch.tensor([0, 5, 3, 8]), max_length_q=4, use_cache=False)
    consistent = {"cu_seq_lens_k": cu, "max_length_q": 5, "max_length_k": 5}
    torch.testing.assert_close(
        model(input_ids=ids[:1], cu_seq_lens_q=cu, use_cache=False, **consistent).logits,
        model(input_ids=ids[:1], cu_seq_lens_q=cu, use_cache=False).logits,
    )


def test_generation_inputs_are_not_taken_for_packed_sequences():
    """generate() passes position_ids of left-padded rows (padding at 1 or 0, then 0, 1, ...): not a packing."""
    model = _model().eval()
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[:1, 2:], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out[0, 6:].tolist() == alone[0, 4:].tolist()


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_flex_attention_and_the_per_sequence_reference_agree():
    """The document-causal FlexAttention used under torch.compile against causal SDPA on each sequence (run here
    eagerly: PyTorch's unfused FlexAttention reference on CPU)."""
    g = torch.Generator().manual_seed(0)
    ids, pos = _packed(_docs())
    segments, _ = packed_segments(pos, None, None, *ids.shape)
    q = torch.randn(3, 4, T, 16, generator=g)
    k, v = torch.randn(3, 2, T, 16, generator=g), torch.randn(3, 2, T, 16, generator=g)
    ref = packed_sdpa(q, k, v, segments, 0.25, bucket=1)  # each sequence exactly, no neighbours in the call
    for bucket in (5, 16, 128):  # calls that also cover later tokens (and padding past the row's end)
        torch.testing.assert_close(packed_sdpa(q, k, v, segments, 0.25, bucket=bucket), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed_flex_attention(q, k, v, segments, 0.25), ref, rtol=1e-5, atol=1e-5)


def test_the_context_limit_applies_to_each_packed_sequence():
    """A flattened row may be longer than the context (TRL's padding-free batches are); each sequence may not."""
    model = _model()
    ok = torch.cat([torch.arange(60), torch.arange(60)])[None]
    model(input_ids=torch.randint(0, 97, (1, 120)), position_ids=ok, use_cache=False)
    too_long = torch.cat([torch.arange(70), torch.arange(50)])[None]
    with pytest.raises(ValueError, match="a packed sequence of 70 tokens is longer than max_position_embeddings=64"):
        model(input_ids=torch.randint(0, 97, (1, 120)), position_ids=too_long, use_cache=False)


@pytest.mark.parametrize("mixers", [("full",), ("linear",), ("csa",)])
def test_positions_that_do_not_continue_the_cache_or_start_elsewhere_are_refused(mixers):
    """Found by a break-it review: a document restarting at 0 right after a cached one (no T x T check sees it),
    or positions that start somewhere else without a cache, were accepted silently (full, linear) or crashed deep
    in CSA's block indexing. Each row's tokens must be numbered from its cached length."""
    model = _model(mixers).eval()
    ids = torch.randint(0, 97, (1, 14))
    out = model(input_ids=ids[:, :8], use_cache=True)
    for positions in (torch.arange(6)[None], torch.cat([torch.arange(8), torch.arange(6)])[None]):
        with pytest.raises(ValueError, match=r"row 0, token 0 has position 0 where 8 was expected"):
            model(input_ids=ids[:, 8:], past_key_values=out.past_key_values, position_ids=positions, use_cache=True)
    with pytest.raises(ValueError, match=r"where 8 was expected"):
        model(input_ids=ids[:, 8:9], past_key_values=out.past_key_values, position_ids=torch.tensor([[0]]))
    for start in (20, -3, 100):
        with pytest.raises(ValueError, match=rf"row 0, token 0 has position {start} where 0 was expected"):
            model(input_ids=ids[:, :6], position_ids=torch.arange(start, start + 6)[None], use_cache=False)


def test_packing_sources_that_disagree_are_refused():
    model = _model()
    ids = torch.randint(0, 97, (1, 20))
    restart = torch.cat([torch.arange(10), torch.arange(10)])[None]
    with pytest.raises(ValueError, match="where 10 was expected"):  # seq_idx says one document, positions two
        model(input_ids=ids, position_ids=restart, seq_idx=torch.zeros(1, 20, dtype=torch.long), use_cache=False)
    with pytest.raises(ValueError, match="where 10 was expected"):
        model(input_ids=ids, position_ids=restart, cu_seq_lens_q=torch.tensor([0, 20]), use_cache=False)
    seq_idx = torch.tensor([[0] * 10 + [1] * 10])
    with pytest.raises(ValueError, match="seq_idx and cu_seq_lens_q describe different packed sequences"):
        model(input_ids=ids, seq_idx=seq_idx, cu_seq_lens_q=torch.tensor([0, 4, 20]), use_cache=False)
    # given as plain lists (as some collators leave them), they are read like tensors
    alone = model(input_ids=ids, seq_idx=seq_idx, use_cache=False).logits
    listed = model(input_ids=ids, cu_seq_lens_q=[0, 10, 20], use_cache=False).logits
    torch.testing.assert_close(listed, alone)
    with pytest.raises(ValueError, match="cannot be cached"):  # generate() with packing inputs
        model.eval().generate(ids, seq_idx=seq_idx, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_the_collator_refuses_a_mix_of_packed_rows_and_plain_examples():
    from llamathink.data.chat import ChatCollator, Example

    packed = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 0, 1]}
    with pytest.raises(ValueError, match="mixes packed rows"):
        ChatCollator(0)([packed, Example([5, 6], [-100, 6])])
