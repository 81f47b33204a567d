"""Teacher networks, the teacher file, and the import of public checkpoint formats.

The public formats are rebuilt here from their documented key layouts (METHOD.md 3.1) with
independent reference networks: a PaCo/LDAM-layout CIFAR ResNet-32 written out below, a MoCo
wrapper around it, and torchvision's ResNet-50.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deitlt_scale.cli import build_parser, main
from deitlt_scale.errors import UserError
from deitlt_scale.models.importers import import_checkpoint, read_checkpoint
from deitlt_scale.models.teacher_file import TeacherInfo, load_teacher, save_teacher
from deitlt_scale.models.teacher_runner import TeacherRunner
from deitlt_scale.models.teachers import NormedLinear, create_teacher_arch, freeze

K = 7


# --------------------------------------------------------------------------------------------
# Reference networks in the published layouts


class RefNormedLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))

    def forward(self, x):
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


class RefBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout // 4 if (stride != 1 or cin != cout) else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad is None:
            short = x
        else:
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return F.relu(out + short)


class RefResNet32(nn.Module):
    """CIFAR ResNet-32 with option-A shortcuts; classifier attribute name is configurable."""

    def __init__(self, num_classes: int, classifier: str = "fc", normed: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin, layers = 16, []
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [RefBlock(cin, cout, stride)] + [RefBlock(cout, cout, 1) for _ in range(4)]
            layers.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier_name = classifier
        setattr(
            self,
            classifier,
            RefNormedLinear(64, num_classes) if normed else nn.Linear(64, num_classes),
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(self.layer3(self.layer2(self.layer1(out))))
        return getattr(self, self.classifier_name)(out.flatten(1))


class MoCoWrapper(nn.Module):
    """PaCo's MoCo container: MLP projection on both encoders, classifiers on the pooled feature
    (read by a forward hook on the encoder's avgpool), queues as buffers."""

    def __init__(self, make_encoder, feat_dim: int, num_classes: int, dim: int = 8, k: int = 16):
        super().__init__()
        self.encoder_q, self.encoder_k = make_encoder(dim), make_encoder(dim)
        for enc in (self.encoder_q, self.encoder_k):
            enc.fc = nn.Sequential(
                nn.Linear(feat_dim, feat_dim), nn.BatchNorm1d(feat_dim), nn.ReLU(), enc.fc
            )
        self.linear = nn.Linear(feat_dim, num_classes)
        self.linear_k = nn.Linear(feat_dim, num_classes)
        self.register_buffer("queue", torch.randn(k, dim))
        self.register_buffer("queue_l", torch.randint(0, num_classes, (k,)))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._feat = None
        list(self.encoder_q.children())[-2].register_forward_hook(self._hook)

    def _hook(self, _module, _inp, output):
        self._feat = output.flatten(1)

    def forward(self, x):
        self.encoder_q(x)  # the projection is computed and discarded, as at PaCo inference
        return self.linear(self._feat)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics, so that eval-mode BatchNorm is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def prefixed(state: dict, prefix: str = "module.") -> dict:
    return {prefix + k: v for k, v in state.items()}


def images(size: int = 32, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def teacher_logits(directory, x) -> torch.Tensor:
    model, _ = load_teacher(directory)
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def paco_r32(tmp_path_factory):
    """(checkpoint path, source model) for a PaCo CIFAR ResNet-32 in a DataParallel MoCo wrapper."""
    torch.manual_seed(0)
    src = MoCoWrapper(lambda dim: RefResNet32(dim, "fc"), feat_dim=64, num_classes=K)
    randomize_bn(src)
    src.eval()
    path = tmp_path_factory.mktemp("paco") / "paco_r32.pth.tar"
    torch.save(
        {
            "epoch": 400,
            "arch": "resnet32",
            "state_dict": prefixed(src.state_dict()),
            "best_acc1": torch.tensor(52.8),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        },
        path,
    )
    return path, src


# --------------------------------------------------------------------------------------------
# Architectures


def test_resnet32_has_the_cifar_layout_with_parameter_free_shortcuts():
    model = create_teacher_arch("resnet32", 10)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 464_154  # ResNet-32 with option-A shortcuts (0.46M) and a 10-way linear
    assert not any("shortcut" in k for k in model.state_dict())
    assert isinstance(model.linear, nn.Linear) and model.linear.weight.shape == (10, 64)
    assert model.eval()(images()).shape == (3, 10)


def test_resnet50_has_the_torchvision_layout_with_classifier_fc():
    from torchvision.models import resnet50

    model = create_teacher_arch("resnet50", K)
    assert list(model.state_dict()) == list(resnet50(num_classes=K).state_dict())
    assert model.fc.weight.shape == (K, 2048)


def test_normed_classifier_is_a_cosine_classifier_stored_features_by_classes():
    model = create_teacher_arch("resnet32", K, normed=True).eval()
    assert isinstance(model.linear, NormedLinear)
    assert model.linear.weight.shape == (64, K) and "linear.bias" not in model.state_dict()
    with torch.no_grad():
        logits = model(images())
    assert logits.abs().max() <= 1.0 + 1e-6


def test_freeze_puts_the_teacher_in_eval_mode_without_gradients():
    model = freeze(create_teacher_arch("resnet32", K), torch.bfloat16, channels_last=True)
    assert not model.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def frozen_teacher(device: str, dtype=torch.float32, channels_last=False) -> nn.Module:
    torch.manual_seed(0)
    model = create_teacher_arch("resnet32", K)
    randomize_bn(model)
    return freeze(model.to(device), dtype, channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runner_feeds_the_resized_batch_in_the_teacher_dtype_and_layout(dtype):
    model = frozen_teacher("cpu", dtype, channels_last=True)
    runner = TeacherRunner(model, 32, dtype, channels_last=True, side_stream=True)
    assert runner.stream is None  # no CUDA device: the forward runs in place
    batch = images(size=48, n=4)  # a student batch at another size than the teacher's input
    resized = F.interpolate(batch, size=(32, 32), mode="bicubic", align_corners=False)
    with torch.no_grad():
        expected = model(resized.to(dtype).contiguous(memory_format=torch.channels_last)).float()
    pending = runner.launch(batch)
    logits = pending.wait()
    assert logits.dtype == torch.float32 and logits.shape == (4, K)
    assert torch.equal(logits, expected)
    assert torch.equal(runner(batch), expected)
    assert not logits.requires_grad


@pytest.mark.gpu
def test_side_stream_gives_the_in_place_logits_without_host_syncs():
    model = frozen_teacher("cuda", torch.bfloat16, channels_last=True)
    in_place = TeacherRunner(model, 32, torch.bfloat16, channels_last=True, side_stream=False)
    overlapped = TeacherRunner(model, 32, torch.bfloat16, channels_last=True, side_stream=True)
    assert overlapped.stream is not None and in_place.stream is None
    batch = images(size=48, n=64).cuda()
    expected = in_place(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        work = torch.randn(2048, 2048, device="cuda")
        pending = overlapped.launch(batch * 1.0)  # a batch written just before on the main stream
        busy = work @ work  # main-stream work queued while the teacher runs
        logits = pending.wait() + 0.0 * busy.sum()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_unknown_teacher_arch_is_a_user_error():
    with pytest.raises(UserError, match="unknown teacher arch 'resnet33'.*timm model name"):
        create_teacher_arch("resnet33", K)


# --------------------------------------------------------------------------------------------
# Teacher file


def test_teacher_file_round_trip_keeps_weights_and_description(tmp_path):
    torch.manual_seed(0)
    model = create_teacher_arch("resnet32", K, normed=True)
    randomize_bn(model)
    model.eval()
    info = TeacherInfo("resnet32", K, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True, "model", "t")
    save_teacher(tmp_path / "t", model, info)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "model.safetensors",
        "teacher.json",
    ]
    loaded, loaded_info = load_teacher(tmp_path / "t")
    assert loaded_info == info
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))


def test_teacher_file_with_a_wrong_class_count_is_a_user_error_naming_the_file(tmp_path):
    save_teacher(tmp_path / "t", create_teacher_arch("resnet32", K), TeacherInfo("resnet32", K, 32))
    meta = tmp_path / "t" / "teacher.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "num_classes": K + 1}))
    with pytest.raises(
        UserError,
        match=r"model\.safetensors does not fit resnet32 with 8 classes: "
        r"linear\.weight has shape \(7, 64\), expected \(8, 64\)",
    ):
        load_teacher(tmp_path / "t")


def test_teacher_file_of_another_arch_is_a_user_error_naming_the_missing_keys(tmp_path):
    save_teacher(tmp_path / "t", create_teacher_arch("resnet32", K), TeacherInfo("resnet32", K, 32))
    meta = tmp_path / "t" / "teacher.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "arch": "resnet50"}))
    with pytest.raises(UserError, match="missing keys"):
        load_teacher(tmp_path / "t")


def test_missing_teacher_directory_is_a_user_error_saying_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match="deitlt teacher import"):
        load_teacher(tmp_path / "nothing")


def test_bad_label_space_in_teacher_json_is_a_user_error(tmp_path):
    save_teacher(tmp_path / "t", create_teacher_arch("resnet32", K), TeacherInfo("resnet32", K, 32))
    meta = tmp_path / "t" / "teacher.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "label_space": "sorted"}))
    with pytest.raises(UserError, match="label_space"):
        load_teacher(tmp_path / "t")


# --------------------------------------------------------------------------------------------
# Import of public formats


def test_paco_checkpoint_imports_with_the_source_models_logits(paco_r32, tmp_path):
    path, src = paco_r32
    report = import_checkpoint("paco", path, "resnet32", K, 32, tmp_path / "t")
    assert set(report.dropped) == {
        "encoder_k",
        "encoder_q.fc",
        "linear_k",
        "queue",
        "queue_l",
        "queue_ptr",
    }
    assert report.info.label_space == "original" and not report.info.normed
    x = images()
    with torch.no_grad():
        expected = src(x)
    assert torch.allclose(teacher_logits(tmp_path / "t", x), expected, atol=1e-5, rtol=1e-5)


def test_paco_resnet50_classifier_becomes_fc(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    src = MoCoWrapper(lambda dim: resnet50(num_classes=dim), feat_dim=2048, num_classes=K)
    randomize_bn(src)
    src.eval()
    torch.save({"state_dict": prefixed(src.state_dict())}, tmp_path / "paco_r50.pth")
    import_checkpoint("paco", tmp_path / "paco_r50.pth", "resnet50", K, 64, tmp_path / "t")
    x = images(64, 2)
    with torch.no_grad():
        expected = src(x)
    assert torch.allclose(teacher_logits(tmp_path / "t", x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("container", "prefix", "normed"),
    [("model", "", True), ("state_dict", "module.", False)],
    ids=["model-normed-unprefixed", "state_dict-linear-dataparallel"],
)
def test_ldam_checkpoint_imports_with_the_source_models_logits(tmp_path, container, prefix, normed):
    torch.manual_seed(0)
    src = RefResNet32(K, classifier="linear", normed=normed)
    randomize_bn(src)
    src.eval()
    torch.save({container: prefixed(src.state_dict(), prefix), "epoch": 200}, tmp_path / "ldam.pth")
    report = import_checkpoint("ldam", tmp_path / "ldam.pth", "resnet32", K, 32, tmp_path / "t")
    assert report.info.normed is normed
    x = images()
    with torch.no_grad():
        expected = src(x)
    assert torch.allclose(teacher_logits(tmp_path / "t", x), expected, atol=1e-5, rtol=1e-5)


def test_torchvision_state_dict_imports_as_resnet50(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    src = resnet50(num_classes=K)
    randomize_bn(src)
    src.eval()
    torch.save(src.state_dict(), tmp_path / "r50.pth")
    import_checkpoint("torchvision", tmp_path / "r50.pth", "resnet50", K, 64, tmp_path / "t")
    x = images(64, 2)
    with torch.no_grad():
        expected = src(x)
    assert torch.allclose(teacher_logits(tmp_path / "t", x), expected, atol=1e-4, rtol=1e-4)


def test_checkpoint_with_a_wrong_class_count_is_a_clear_error(paco_r32, tmp_path):
    path, _ = paco_r32
    with pytest.raises(
        UserError, match=rf"{path.name}: .* i\.e\. {K} classes, but --num-classes is 100"
    ):
        import_checkpoint("paco", path, "resnet32", 100, 32, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_checkpoint_of_another_arch_is_a_clear_error(paco_r32, tmp_path):
    path, _ = paco_r32
    with pytest.raises(UserError, match="pools 2048-d features; check --arch"):
        import_checkpoint("paco", path, "resnet50", K, 32, tmp_path / "t")


def test_checkpoint_with_a_misshaped_tensor_is_a_clear_error_naming_the_key(tmp_path):
    state = RefResNet32(K, "linear").state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(32, 8, 3, 3)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"layer2\.0\.conv1\.weight has shape \(32, 8, 3, 3\)"):
        import_checkpoint("ldam", tmp_path / "bad.pth", "resnet32", K, 32, tmp_path / "t")


def test_non_paco_checkpoint_with_format_paco_says_which_format_to_try(tmp_path):
    torch.save({"state_dict": RefResNet32(K, "linear").state_dict()}, tmp_path / "ldam.pth")
    with pytest.raises(UserError, match="not a PaCo/MoCo checkpoint; try --format ldam"):
        import_checkpoint("paco", tmp_path / "ldam.pth", "resnet32", K, 32, tmp_path / "t")


class _RunsCode:
    """Unpickling this object would run a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_when_unpickled_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    state = RefResNet32(K, "linear").state_dict()
    torch.save({"state_dict": state, "hook": _RunsCode(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match=r"refers to posix\.system.*refusing to unpickle code"):
        import_checkpoint("ldam", tmp_path / "evil.pth", "resnet32", K, 32, tmp_path / "t")
    assert not marker.exists()
    assert not (tmp_path / "t").exists()


def test_checkpoint_with_saved_argparse_arguments_is_accepted(tmp_path):
    state = RefResNet32(K, "linear").state_dict()
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "a.pth")
    assert read_checkpoint(tmp_path / "a.pth")["args"].lr == 0.1


def test_import_refuses_to_replace_an_existing_teacher_without_overwrite(paco_r32, tmp_path):
    path, _ = paco_r32
    import_checkpoint("paco", path, "resnet32", K, 32, tmp_path / "t")
    with pytest.raises(UserError, match="--overwrite"):
        import_checkpoint("paco", path, "resnet32", K, 32, tmp_path / "t")
    import_checkpoint("paco", path, "resnet32", K, 32, tmp_path / "t", overwrite=True)


def test_cli_teacher_import_writes_a_teacher_and_reports_errors_as_exit_2(
    paco_r32, tmp_path, capsys
):
    path, _ = paco_r32
    common = [
        "teacher",
        "import",
        "--format",
        "paco",
        "--checkpoint",
        str(path),
        "--arch",
        "resnet32",
        "--input-size",
        "32",
        "--label-space",
        "model",
    ]
    assert main([*common, "--num-classes", str(K), "--out", str(tmp_path / "t")]) == 0
    assert "logits verified" in capsys.readouterr().out
    assert json.loads((tmp_path / "t" / "teacher.json").read_text())["label_space"] == "model"
    assert main([*common, "--num-classes", "3", "--out", str(tmp_path / "u")]) == 2
    assert "--num-classes is 3" in capsys.readouterr().err


def test_cli_teacher_train_takes_a_recipe_overrides_and_dry_run():
    args = build_parser().parse_args(
        ["teacher", "train", "recipes/teacher_digits.yaml", "optim.lr=0.05", "--dry-run"]
    )
    assert (args.teacher_command, args.recipe, args.overrides, args.dry_run) == (
        "train",
        "recipes/teacher_digits.yaml",
        ["optim.lr=0.05"],
        True,
    )


# --------------------------------------------------------------------------------------------
# timm teachers


@pytest.fixture(scope="module")
def timm_regnet(tmp_path_factory):
    """(checkpoint path, source model): a small timm RegNetY with random weights, saved as DeiT's
    training script saves its teacher ({"model": state dict}) from a DataParallel model."""
    import timm

    torch.manual_seed(0)
    src = timm.create_model("regnety_002", pretrained=False, num_classes=K)
    randomize_bn(src)
    src.eval()
    path = tmp_path_factory.mktemp("timm") / "regnety_002.pth"
    torch.save({"model": prefixed(src.state_dict()), "epoch": 299}, path)
    return path, src


def test_any_timm_cnn_is_a_teacher_arch_built_without_downloading():
    model = create_teacher_arch("regnety_002", K)
    assert model.get_classifier().out_features == K
    with pytest.raises(UserError, match="normed.*for the ResNets only"):
        create_teacher_arch("regnety_002", K, normed=True)


def test_timm_checkpoint_imports_with_timms_input_config_and_the_source_logits(
    timm_regnet, tmp_path
):
    path, src = timm_regnet
    report = import_checkpoint("timm", path, "regnety_002", K, None, tmp_path / "t")
    assert (report.info.input_size, report.info.mean, report.info.std) == (
        224,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )
    teacher, info = load_teacher(tmp_path / "t")
    assert (info.arch, info.normed, info.label_space) == ("regnety_002", False, "original")
    x = images(224, 2)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), src(x), rtol=0, atol=1e-5)


def test_timm_import_records_overridden_size_and_normalisation(timm_regnet, tmp_path):
    path, _ = timm_regnet
    report = import_checkpoint(
        "timm", path, "regnety_002", K, 64, tmp_path / "t", mean=(0.5, 0.5, 0.5), std=(0.25,) * 3
    )
    info = json.loads((tmp_path / "t" / "teacher.json").read_text())
    assert (info["input_size"], info["mean"], info["std"]) == (64, [0.5] * 3, [0.25] * 3)
    assert report.info.input_size == 64


def test_timm_checkpoint_with_a_wrong_class_count_is_a_clear_error(timm_regnet, tmp_path):
    path, _ = timm_regnet
    with pytest.raises(
        UserError, match=r"head.fc.weight has shape \(7, 368\), expected \(3, 368\)"
    ):
        import_checkpoint("timm", path, "regnety_002", 3, None, tmp_path / "t")


def test_format_and_arch_must_agree_on_who_builds_the_network(timm_regnet, paco_r32, tmp_path):
    with pytest.raises(UserError, match="--format timm needs a timm model name.*--format paco"):
        import_checkpoint("timm", paco_r32[0], "resnet32", K, 32, tmp_path / "t")
    with pytest.raises(UserError, match="--format ldam needs --arch.*use --format timm"):
        import_checkpoint("ldam", timm_regnet[0], "regnety_002", K, 224, tmp_path / "t")
    with pytest.raises(UserError, match="--format paco needs --input-size"):
        import_checkpoint("paco", paco_r32[0], "resnet32", K, None, tmp_path / "t")


def test_teacher_json_with_an_unknown_arch_is_a_user_error(tmp_path):
    save_teacher(tmp_path / "t", create_teacher_arch("resnet32", K), TeacherInfo("resnet32", K, 32))
    info = json.loads((tmp_path / "t" / "teacher.json").read_text())
    (tmp_path / "t" / "teacher.json").write_text(json.dumps({**info, "arch": "resnet33"}))
    with pytest.raises(
        UserError, match="arch 'resnet33' is neither resnet8 nor resnet14 .* nor resnet50 nor"
    ):
        load_teacher(tmp_path / "t")


def test_cli_imports_a_timm_teacher_without_input_size(timm_regnet, tmp_path, capsys):
    path, _ = timm_regnet
    argv = ["teacher", "import", "--format", "timm", "--checkpoint", str(path)]
    argv += ["--arch", "regnety_002", "--num-classes", str(K), "--out", str(tmp_path / "t")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "regnety_002" in out and "224 px" in out and "logits verified" in out
    assert main([*argv[:-1], str(tmp_path / "u"), "--format", "paco", "--arch", "resnet32"]) == 2
    assert "needs --input-size" in capsys.readouterr().err
