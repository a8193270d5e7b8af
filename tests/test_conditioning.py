import pytest
import torch

from physmaster.conditioning import PhysTokens, append_tokens, apply_to_conditioning, strip_tokens
from physmaster.errors import BatchMismatchError, WidthMismatchError


def test_append_shapes_strength_and_dtype():
    ctx = torch.randn(2, 7, 16, dtype=torch.float16)
    tok = torch.ones(2, 3, 16)
    out, mask = append_tokens(ctx, tok, 0.5)
    assert out.shape == (2, 10, 16) and out.dtype == torch.float16 and mask is None
    assert torch.equal(out[:, :7], ctx)
    assert torch.all(out[:, 7:] == 0.5)


def test_batch_of_one_broadcasts_both_ways():
    out, _ = append_tokens(torch.randn(4, 5, 8), torch.randn(1, 2, 8))
    assert out.shape == (4, 7, 8)
    ctx = torch.randn(1, 5, 8)
    tok = torch.randn(3, 2, 8)
    out, mask = append_tokens(ctx, tok, attention_mask=torch.ones(1, 5))
    assert out.shape == (3, 7, 8) and mask.shape == (3, 7)
    assert torch.equal(out[2, 5:], tok[2])


def test_mask_extended_with_ones():
    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.int64)
    out, m = append_tokens(torch.randn(1, 4, 8), torch.randn(1, 3, 8), attention_mask=mask)
    assert m.tolist() == [[1, 1, 0, 0, 1, 1, 1]] and m.dtype == torch.int64


def test_width_mismatch_names_both_widths():
    with pytest.raises(WidthMismatchError) as e:
        append_tokens(torch.randn(1, 4, 4096), torch.randn(1, 3, 5120), what="the positive conditioning",
                      source="encoder wan:abc")
    msg = str(e.value)
    assert "5120" in msg and "4096" in msg and "encoder wan:abc" in msg and "positive" in msg


def test_batch_mismatch():
    with pytest.raises(BatchMismatchError, match="batch 3 .* batch 2"):
        append_tokens(torch.randn(2, 4, 8), torch.randn(3, 1, 8))


def test_bad_rank():
    with pytest.raises(WidthMismatchError, match="expected \\[batch, length, width\\]"):
        append_tokens(torch.randn(4, 8), torch.randn(1, 1, 8))


def test_strip_inverts_append():
    ctx, mask = torch.randn(2, 5, 8), torch.ones(2, 5)
    out, m = append_tokens(ctx, torch.randn(2, 3, 8), attention_mask=mask)
    back, bm = strip_tokens(out, 3, m)
    assert torch.equal(back, ctx) and torch.equal(bm, mask)


def _phys(b=1, n=2, d=8):
    return PhysTokens(tokens=torch.randn(b, n, d), encoder_id="t:1", features=torch.randn(b, 5, 4))


def test_apply_to_conditioning_records_and_copies():
    cond = [[torch.randn(1, 4, 8), {"pooled_output": None, "attention_mask": torch.ones(1, 4)}]]
    phys = _phys()
    out = apply_to_conditioning(cond, phys, 2.0)
    assert out is not cond and "physmaster" not in cond[0][1]  # input untouched
    assert out[0][0].shape == (1, 6, 8) and out[0][1]["attention_mask"].shape == (1, 6)
    rec = out[0][1]["physmaster"]
    assert rec["num_tokens"] == 2 and rec["encoder_id"] == "t:1" and rec["strength"] == 2.0
    assert torch.equal(rec["features"], phys.features)
    assert torch.allclose(out[0][0][:, 4:], phys.tokens * 2)


def test_apply_twice_replaces():
    cond = [[torch.randn(1, 4, 8), {}]]
    once = apply_to_conditioning(cond, _phys(), 1.0)
    twice = apply_to_conditioning(once, _phys(n=3), 1.0)
    assert twice[0][0].shape == (1, 7, 8)
    assert torch.equal(twice[0][0][:, :4], cond[0][0])


def test_strength_zero_is_identity():
    cond = [[torch.randn(1, 4, 8), {}]]
    assert apply_to_conditioning(cond, _phys(), 0.0) is cond


def test_square_mask_rejected():
    cond = [[torch.randn(1, 4, 8), {"attention_mask": torch.zeros(1, 4, 4)}]]
    with pytest.raises(BatchMismatchError, match=r"\[batch, length\]"):
        apply_to_conditioning(cond, _phys(), 1.0)
