"""cuDNN attention is off inside terse's forward passes on CUDA and the caller's setting comes back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from terse.backend.attention_kernels import no_cudnn_attention

CUDA = torch.device("cuda")  # only the device type is read: no GPU needed


@pytest.fixture
def cudnn_on() -> Iterator[None]:
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_off_inside_restored_after_nesting(cudnn_on: None) -> None:
    with no_cudnn_attention(CUDA):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        with no_cudnn_attention(CUDA):
            assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # the outer block is still running
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_overlapping_users_restore_only_when_the_last_leaves(cudnn_on: None) -> None:
    # two threads' blocks interleaved: A enters, B enters, A leaves, B leaves
    a, b = no_cudnn_attention(CUDA), no_cudnn_attention(CUDA)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    b.__exit__(None, None, None)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_restored_after_an_error_and_untouched_off_cuda(cudnn_on: None) -> None:
    with pytest.raises(ValueError), no_cudnn_attention(CUDA):
        raise ValueError("forward failed")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with no_cudnn_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()
