"""The teacher sees the student's batch normalised with the teacher's own mean and std."""

from __future__ import annotations

import torch

from deitlt_scale.models.teacher_runner import TeacherRunner
from deitlt_scale.models.teachers import create_teacher_arch, resize_for_teacher

STUDENT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet, the student's data.mean/std
TEACHER = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # CIFAR statistics


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_teacher_arch("resnet32", 10).eval()


def _runner(teacher: torch.nn.Module, teacher_stats) -> TeacherRunner:
    """The teacher at 32 px, fed batches normalised with the student's statistics."""
    return TeacherRunner(
        teacher,
        32,
        student_mean=STUDENT[0],
        student_std=STUDENT[1],
        teacher_mean=teacher_stats[0],
        teacher_std=teacher_stats[1],
    )


def _normalise(pixels: torch.Tensor, stats) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    return (pixels - mean) / std


def test_a_teacher_with_other_statistics_sees_the_pixels_normalised_its_way() -> None:
    pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    teacher = _teacher()
    runner = _runner(teacher, TEACHER)
    with torch.no_grad():
        want = teacher(resize_for_teacher(_normalise(pixels, TEACHER), 32))
        plain = teacher(resize_for_teacher(_normalise(pixels, STUDENT), 32))
    got = runner(_normalise(pixels, STUDENT))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, rtol=1e-3, atol=1e-3)  # the change is not negligible


def test_equal_statistics_leave_the_batch_untouched() -> None:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    teacher = _teacher()
    runner = _runner(teacher, STUDENT)
    assert runner.affine is None
    with torch.no_grad():
        assert torch.equal(runner(images), teacher(images))


def test_the_analysis_feeds_a_teacher_file_as_training_does(tmp_path) -> None:
    from deitlt_scale.analysis.loading import load_teacher_model
    from deitlt_scale.models.teacher_file import TeacherInfo, save_teacher

    info = TeacherInfo(
        arch="resnet32", num_classes=10, input_size=32, mean=TEACHER[0], std=TEACHER[1],
        normed=False, label_space="model", source="test",
    )  # fmt: skip
    save_teacher(tmp_path / "teacher", _teacher(), info)
    runner = load_teacher_model(tmp_path / "teacher", torch.device("cpu"), *STUDENT)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _teacher()(_normalise(pixels, TEACHER))
    torch.testing.assert_close(runner(_normalise(pixels, STUDENT)), want, rtol=1e-4, atol=1e-4)
