"""The raw-dataset kinds `deitlt data prepare` reads, in one table.

Each :class:`Source` names its reader (a function of :mod:`deitlt_scale.data.sources` or
:mod:`deitlt_scale.data.list_sources`, imported when it runs), the options it accepts, those it
requires, and its line of ``deitlt data prepare --help``. The command line's choices, the help
text and the checks of :func:`deitlt_scale.data.prepare.prepare_dataset` all come from
:data:`SOURCES`, so a new source is its reader plus one row here. This module imports only the standard library: the CLI builds
its parser from it without loading numpy or Pillow.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deitlt_scale.data.sources import SourceData

# The options a source may accept, in the order prepare_dataset checks them. ``profile`` counts as
# given when it is not the default "exp".
OPTIONS = (
    "root",
    "train_list",
    "eval_list",
    "num_classes",
    "eval_root",
    "eval_fraction",
    "imbalance",
    "name",
    "profile",
    "val_per_class",
    "val_list",
)
# What a required option names, for the error raised when it is missing.
_MEANING = {"root": "the raw dataset's location"}


@dataclass(frozen=True)
class SourceArgs:
    """The source options of one preparation; None where not given (``profile``: "exp")."""

    root: str | Path | None = None
    train_list: str | Path | None = None
    eval_list: str | Path | None = None
    num_classes: int | None = None
    eval_root: str | Path | None = None
    eval_fraction: float | None = None
    imbalance: float | None = None
    name: str | None = None
    profile: str = "exp"
    val_per_class: int | str | None = None
    val_list: str | Path | None = None
    skip_bad: bool = False  # list sources: skip bad lines instead of failing; others ignore it

    def given(self) -> dict[str, object]:
        """The options of :data:`OPTIONS` that were given, in that order."""
        return {
            option: getattr(self, option)
            for option in OPTIONS
            if (self.profile != "exp" if option == "profile" else getattr(self, option) is not None)
        }


@dataclass(frozen=True)
class Source:
    """One raw-dataset kind.

    ``read(name, args)`` returns its records; ``options`` are the :data:`OPTIONS` it accepts
    (any other one given is refused); ``required`` must be given; ``help`` is what it reads, as
    shown under "sources and what they read" (sources with the same text share a row).
    """

    read: Callable[[str, SourceArgs], SourceData]
    options: tuple[str, ...]
    required: tuple[str, ...]
    help: str

    def missing(self, name: str, args: SourceArgs) -> str | None:
        """The error for the first required option not given, or None."""
        for option in self.required:
            if getattr(args, option) is None:
                return f"{name} needs {_flag(option)} ({_MEANING[option]})"
        return None


def _cifar(name: str, args: SourceArgs) -> SourceData:
    from deitlt_scale.data import sources

    assert args.root is not None  # required
    imbalance = args.imbalance or sources.CIFAR_IMBALANCE
    return sources.read_cifar(name, args.root, imbalance, args.profile, args.val_per_class)


def _digits(name: str, args: SourceArgs) -> SourceData:
    from deitlt_scale.data import sources

    return sources.read_digits(
        args.imbalance or sources.DIGITS_IMBALANCE, args.profile, args.val_per_class
    )


def _folder(name: str, args: SourceArgs) -> SourceData:
    from deitlt_scale.data import list_sources

    assert args.root is not None  # required
    return list_sources.read_folder(args.root, args.eval_root, args.eval_fraction, args.name)


def _lists(name: str, args: SourceArgs) -> SourceData:
    from deitlt_scale.data import list_sources

    assert args.root is not None  # required
    return list_sources.read_lists(
        name, args.root, args.train_list, args.eval_list, args.num_classes, args.skip_bad,
        args.name, args.val_list,
    )  # fmt: skip


_CIFAR_HELP = (
    "--root: cifar-10-python.tar.gz / cifar-100-python.tar.gz, the folder holding it, or the "
    "extracted folder; --imbalance N_max/N_min (100)"
)
_STANDARD_LISTS_HELP = (
    "--root: image root; --train-list/--eval-list '<path> <label>' files (default: the standard "
    "list names inside --root)"
)
_LT_OPTIONS = ("imbalance", "profile", "val_per_class")
_LIST_OPTIONS = ("root", "train_list", "eval_list", "num_classes", "val_list")

SOURCES: dict[str, Source] = {
    "cifar10-lt": Source(_cifar, ("root", *_LT_OPTIONS), ("root",), _CIFAR_HELP),
    "cifar100-lt": Source(_cifar, ("root", *_LT_OPTIONS), ("root",), _CIFAR_HELP),
    "imagenet-lt": Source(_lists, _LIST_OPTIONS, ("root",), _STANDARD_LISTS_HELP),
    "inat2018": Source(_lists, _LIST_OPTIONS, ("root",), _STANDARD_LISTS_HELP),
    "places-lt": Source(
        _lists,
        _LIST_OPTIONS,
        ("root",),
        "--root: the Places-365 image root; --train-list/--eval-list (default: Places_LT_train.txt"
        " and Places_LT_test.txt in --root, 365 classes); --val-list Places_LT_val.txt for the "
        "official 20-per-class val split",
    ),
    "folder": Source(
        _folder,
        ("root", "eval_root", "eval_fraction", "name"),
        ("root",),
        "--root: one sub-folder per class; --eval-root or --eval-fraction",
    ),
    "list": Source(
        _lists,
        (*_LIST_OPTIONS, "name"),
        ("root",),
        "any '<path> <label>' lists: --root, --train-list/--eval-list as for imagenet-lt (no "
        "default names); --name names the dataset",
    ),
    "digits-lt": Source(
        _digits,
        _LT_OPTIONS,
        (),
        "the embedded default: scikit-learn's 8x8 digits, long-tailed; --imbalance (20)",
    ),
}


def accepting(option: str) -> tuple[str, ...]:
    """The sources that accept ``option``, in table order."""
    return tuple(name for name, source in SOURCES.items() if option in source.options)


def refusal(name: str, args: SourceArgs) -> str | None:
    """The error for the first given option that source ``name`` does not accept, or None."""
    accepted = SOURCES[name].options
    for option in args.given():
        if option not in accepted:
            users = ", ".join(accepting(option))
            return f"{_flag(option)} does not apply to {name}; it is for {users}"
    return None


def help_rows(width: int = 98, names_width: int = 26) -> str:
    """The "sources and what they read" rows of the help: names, then the wrapped text."""
    rows: list[tuple[list[str], str]] = []
    for name, source in SOURCES.items():
        if rows and rows[-1][1] == source.help:
            rows[-1][0].append(name)
        else:
            rows.append(([name], source.help))
    lines = []
    indent = " " * (2 + names_width)
    for names, text in rows:
        wrapped = textwrap.wrap(text, width - len(indent), break_on_hyphens=False)
        lines.append(f"  {', '.join(names):<{names_width}}{wrapped[0]}")
        lines.extend(indent + line for line in wrapped[1:])
    return "\n".join(lines)


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")
