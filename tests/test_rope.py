"""Rotary embeddings: rotations (norms kept), relative scores, token_xcorr still relative."""

import torch

from leviathan.model import correlation as xc
from leviathan.model.rope import apply_rope, rope_angles

F64 = torch.float64


def rotate(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    T = x.shape[2]
    return apply_rope(x, *rope_angles(torch.arange(start, start + T), x.shape[-1]))


def test_a_rotation_per_channel_pair():
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    y = rotate(x)
    torch.testing.assert_close(
        y.unflatten(-1, (4, 2)).norm(dim=-1), x.unflatten(-1, (4, 2)).norm(dim=-1)
    )
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0: no rotation
    cos, sin = rope_angles(torch.tensor([1]), 8)
    assert torch.allclose(
        y[0, 0, 1, :2],
        torch.stack(
            [
                x[0, 0, 1, 0] * cos[0, 0] - x[0, 0, 1, 1] * sin[0, 0],
                x[0, 0, 1, 0] * sin[0, 0] + x[0, 0, 1, 1] * cos[0, 0],
            ]
        ).to(F64),
    )


def test_scores_depend_on_the_offset_only():
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=F64).unbind(0)

    # the same q and k at positions (i, j) and (i + s, j + s)
    def score(i: int, j: int) -> torch.Tensor:
        qi = apply_rope(q, *rope_angles(torch.tensor([i]), 16))
        kj = apply_rope(k, *rope_angles(torch.tensor([j]), 16))
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_token_xcorr_on_rotated_inputs_is_shift_invariant():
    """Scores of rotated q, k through the lag filter: shifting every position by s (a
    sequence that starts later) changes nothing, away from the zero padding at the start."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 12, 8, dtype=F64, generator=gen) for _ in range(2))
    f, g = (torch.randn(2, 2, 3, dtype=F64, generator=gen) for _ in range(2))
    at0 = xc.token_xcorr_scores(rotate(q), rotate(k), f, g)
    at7 = xc.token_xcorr_scores(rotate(q, 7), rotate(k, 7), f, g)
    torch.testing.assert_close(at7, at0, rtol=1e-10, atol=1e-10)
