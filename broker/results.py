"""The results a request's plan reads, held by name.

A plan that only adds and subtracts results (``Method.by_name``) is fed the names of its
results (``Ref``: task id and target step), not the tensors; its tasks and hits then carry a
name, or the operation that makes their latent from names (``Rectify``, ``Parareal``). This
store keeps the tensors behind the names and computes an operation when a task goes out or a
hit is released (``algorithms.base.evaluate``: the plan's own arithmetic, so the same bits).
After every completion it keeps only what the plan still names (``TaskLedger.names``): a
result is let go as soon as no later task or hit reads it.

The plan no longer says where a latent is, only what it is made of: the first step towards
results that stay on the workers that computed them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from chords_mq.algorithms.base import Latent, Ref, evaluate
from chords_mq.errors import PlanProtocolError


class ResultStore:
    """Named results of one request and their tensors."""

    def __init__(self) -> None:
        self._tensors: dict[Ref, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, ref: object) -> bool:
        return ref in self._tensors

    def put(self, task_id: int, results: Mapping[int, torch.Tensor]) -> dict[int, Ref]:
        """Keep one task's checked results; returns their names, by target step."""
        named = {}
        for target, tensor in results.items():
            ref = Ref(task_id, target)
            self._tensors[ref] = tensor
            named[target] = ref
        return named

    def _tensor(self, ref: Ref) -> torch.Tensor:
        tensor = self._tensors.get(ref)
        if tensor is None:
            raise PlanProtocolError(f"result {ref} is not held (dropped, or never computed)")
        return tensor

    def evaluate(self, value: Latent) -> torch.Tensor:
        """The tensor ``value`` stands for (an operation is computed, in place where the plan
        said its first operand is held exclusively)."""
        return evaluate(value, self._tensor)

    def keep_only(self, names: set[Ref]) -> int:
        """Let go of every result not in ``names``; returns how many were let go."""
        dropped = [ref for ref in self._tensors if ref not in names]
        for ref in dropped:
            del self._tensors[ref]
        return len(dropped)

    def clear(self) -> None:
        self._tensors.clear()

    def tensors(self) -> list[torch.Tensor]:
        return list(self._tensors.values())
