"""The frozen teacher fed as training feeds it, and overlapped with the student on CUDA.

The teacher sees the student's mixed, normalised batch resized to its own input size
(:func:`~deitlt_scale.models.teachers.resize_for_teacher`), cast to its dtype and memory format.
Its targets depend on that batch only, never on the student, so on CUDA its forward can run on a
side stream while the student's forward runs on the main one: :meth:`TeacherRunner.launch`
queues it and returns at once, and :meth:`PendingLogits.wait` makes the main stream wait for it
on the device (an event wait: the host never blocks). Elsewhere, or with ``side_stream=False``,
the forward runs in place and ``wait`` returns its result; the logits are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deitlt_scale.models.teachers import resize_for_teacher


@dataclass
class PendingLogits:
    """Teacher logits (fp32); with ``done`` set they may still be computing on a side stream."""

    logits: Tensor
    done: torch.cuda.Event | None = None

    def wait(self) -> Tensor:
        """The logits, safe to use on the current stream."""
        if self.done is not None:
            current = torch.cuda.current_stream(self.logits.device)
            current.wait_event(self.done)
            # The logits were allocated on the side stream: keep their memory from being reused
            # there until the current stream's work that reads them has run.
            self.logits.record_stream(current)
            self.done = None
        return self.logits


class TeacherRunner:
    """Runs a frozen teacher (see :func:`~deitlt_scale.models.teachers.freeze`) on student batches.

    ``dtype`` and ``channels_last`` must match how the teacher was frozen; ``side_stream`` takes
    effect only when the teacher lives on a CUDA device.
    """

    def __init__(
        self,
        teacher: nn.Module,
        input_size: int,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        side_stream: bool = False,
    ) -> None:
        self.teacher, self.input_size = teacher, input_size
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        device = next(teacher.parameters()).device
        self.stream = torch.cuda.Stream(device) if side_stream and device.type == "cuda" else None

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """fp32 logits of ``images`` (the student's batch at any size), on the current stream."""
        x = resize_for_teacher(images, self.input_size)
        return self.teacher(x.to(dtype=self.dtype, memory_format=self.memory_format)).float()

    def launch(self, images: Tensor) -> PendingLogits:
        """Start the forward of ``images``; on the side stream when there is one."""
        if self.stream is None:
            return PendingLogits(self(images))
        self.stream.wait_stream(torch.cuda.current_stream(images.device))  # the batch is ready
        with torch.cuda.stream(self.stream):
            logits = self(images)
            done = torch.cuda.Event()
            done.record()
        # ``images`` belongs to the current stream: keep its memory from being reused there
        # before the side stream has read it.
        images.record_stream(self.stream)
        return PendingLogits(logits, done)
