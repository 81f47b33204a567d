"""The frozen teacher fed as training feeds it, and overlapped with the student on CUDA.

The teacher sees the student's mixed, normalised batch resized to its own input size
(:func:`~deitlt_scale.models.teachers.resize_for_teacher`), re-normalised from the student's
mean/std to the teacher's when they differ (as timm's distillation task does:
``x_t = (x * std_s + mean_s - mean_t) / std_t``, one affine per channel; it commutes with the
resize, so it runs on the smaller tensor), cast to its dtype and memory format.
Its targets depend on that batch only, never on the student, so on CUDA its forward can run on a
side stream while the student's forward runs on the main one: :meth:`TeacherRunner.launch`
queues it and returns at once, and :meth:`PendingLogits.wait` makes the main stream wait for it
on the device (an event wait: the host never blocks). Elsewhere, or with ``side_stream=False``,
the forward runs in place and ``wait`` returns its result; the logits are the same either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deitlt_scale.config import IMAGENET_MEAN, IMAGENET_STD
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


def renormalisation(
    student_mean: Sequence[float],
    student_std: Sequence[float],
    teacher_mean: Sequence[float],
    teacher_std: Sequence[float],
    device: torch.device,
) -> tuple[Tensor, Tensor] | None:
    """Per-channel ``(scale, shift)``, each (1, 3, 1, 1) fp32, taking images normalised with the
    student's statistics to the teacher's: ``x * std_s / std_t + (mean_s - mean_t) / std_t``;
    None when the statistics are the same."""
    if tuple(student_mean) == tuple(teacher_mean) and tuple(student_std) == tuple(teacher_std):
        return None
    mean_s, std_s, mean_t, std_t = (
        torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1)
        for v in (student_mean, student_std, teacher_mean, teacher_std)
    )
    scale, shift = std_s / std_t, (mean_s - mean_t) / std_t
    return scale.float().to(device), shift.float().to(device)


class TeacherRunner:
    """Runs a frozen teacher (see :func:`~deitlt_scale.models.teachers.freeze`) on student batches.

    ``dtype`` and ``channels_last`` must match how the teacher was frozen; ``side_stream`` takes
    effect only when the teacher lives on a CUDA device. ``student_mean``/``student_std`` are the
    student data's normalisation (``data.mean``/``data.std``), ``teacher_mean``/``teacher_std``
    the teacher file's (``TeacherInfo``), all in [0, 1] units; equal ones leave the batch as is.
    """

    def __init__(
        self,
        teacher: nn.Module,
        input_size: int,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        side_stream: bool = False,
        *,
        student_mean: Sequence[float] = IMAGENET_MEAN,
        student_std: Sequence[float] = IMAGENET_STD,
        teacher_mean: Sequence[float] = IMAGENET_MEAN,
        teacher_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.teacher, self.input_size = teacher, input_size
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        device = next(teacher.parameters()).device
        self.stream = torch.cuda.Stream(device) if side_stream and device.type == "cuda" else None
        self.affine = renormalisation(student_mean, student_std, teacher_mean, teacher_std, device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """fp32 logits of ``images`` (the student's batch at any size), on the current stream."""
        x = resize_for_teacher(images, self.input_size)
        if self.affine is not None:
            scale, shift = self.affine
            x = torch.addcmul(shift, x, scale)  # x * scale + shift, one pass
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
