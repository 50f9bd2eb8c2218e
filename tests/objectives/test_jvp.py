"""fewstep.objectives.jvp: the one-line ForwardADError quotes the model's error on one line, cut at 240 characters
with an ellipsis (the message as a whole: tests/objectives/test_meanflow.py)."""

from __future__ import annotations

import pytest
import torch

from fewstep.objectives.jvp import ForwardADError, time_derivative


class Broken(torch.nn.Module):
    """A model whose forward raises a forward-AD error with the given text."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def forward(self, x, t, tt, cond):
        raise RuntimeError(self.text)


def quoted(text: str) -> str:
    """The part of the ForwardADError message that quotes the model's error."""
    with pytest.raises(ForwardADError) as err:
        time_derivative(
            Broken(text),
            torch.zeros(1, 2),
            torch.ones(1),
            torch.zeros(1),
            None,
            torch.zeros(1, 2),
            objective="objective=meanflow",
        )
    message = str(err.value)
    head = "Broken cannot run under forward-mode AD (torch.func.jvp), which objective=meanflow needs: "
    tail = (
        " -- give the failing op a forward-AD formula (an autograd.Function needs setup_context and jvp), or train "
        "with objective=twinflow, rcgm or flow_matching (no JVP)"
    )
    assert message.startswith(head) and message.endswith(tail)
    return message[len(head) : -len(tail)]


def test_the_models_error_is_quoted_on_one_line():
    assert quoted("jvp failed\n  in   op\tfoo\n") == "jvp failed in op foo"


@pytest.mark.parametrize(
    "length, want",
    [(239, None), (240, None), (241, 240), (300, 240)],
)
def test_the_quote_is_cut_at_240_characters_with_an_ellipsis(length, want):
    text = "jvp:" + "".join(chr(ord("a") + i % 26) for i in range(length - 4))
    assert len(text) == length
    assert quoted(text) == (text if want is None else text[:want] + "…")


def test_unwrap_returns_the_module_under_data_parallel_wrappers():
    from fewstep.objectives.jvp import unwrap

    inner = torch.nn.Linear(2, 2)
    assert unwrap(torch.nn.DataParallel(torch.nn.DataParallel(inner))) is inner
    assert unwrap(inner) is inner
