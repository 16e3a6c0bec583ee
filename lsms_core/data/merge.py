"""Merge LSMS dataset folders into one, e.g. a benchmark plus extra training cases or corrections.

``merge_datasets(out, [first, second, ...], train_only=[second])`` writes a new dataset folder:

* the first source's case and expression ids are kept, so reports on its splits stay comparable;
  every later source's ids get its folder name as a prefix (``extra-synth_000``), which makes them
  unique whatever the sources are called inside;
* each source keeps its splits, except the sources in ``train_only``: all their cases train;
* case files are hard-linked where the file system allows it (else copied), and the whole folder
  appears in one rename when it is complete, so an interrupted merge leaves nothing half-written;
* ``dataset.json`` records every source (its ``dataset.json`` and content fingerprint).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from lsms_core.data.dataset import SPLITS, DatasetWriter, ReferringDataset, _check_case_id

__all__ = ["merge_datasets"]


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # another file system, or links not supported
        shutil.copy2(src, dst)


def merge_datasets(
    out: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    *,
    train_only: Sequence[str | os.PathLike] = (),
    name: str | None = None,
) -> Path:
    """Write the dataset folder ``out`` holding every case and expression of ``sources``.

    Args:
        out: the folder to create (must not exist or be empty).
        sources: dataset folders; at least two.
        train_only: sources (a subset of ``sources``) whose cases all go to the ``train`` split.
        name: the merged dataset's name (default: the source names joined by ``+``).

    Returns:
        ``out``, readable with :class:`~lsms_core.data.dataset.ReferringDataset`.

    Raises:
        ValueError: fewer than two sources, a source given twice, ``train_only`` naming a folder
            that is not a source, a source without splits that is not ``train_only``, or two sources
            that would give the same case id (later sources with the same folder name).
    """
    from lsms_core._atomic import atomic_folder

    roots = [Path(s).resolve() for s in sources]
    if len(roots) < 2:
        raise ValueError("merge_datasets needs at least two dataset folders to merge")
    if len(set(roots)) != len(roots):
        raise ValueError("a dataset folder is given twice; pass each source once")
    train_roots = {Path(s).resolve() for s in train_only}
    if not train_roots <= set(roots):
        unknown = sorted(str(p) for p in train_roots - set(roots))
        raise ValueError(f"train_only names folders that are not sources: {unknown}")
    datasets = [ReferringDataset(root) for root in roots]  # validates each source first
    prefixes = [""] + [f"{root.name}-" for root in roots[1:]]
    for prefix in prefixes[1:]:
        _check_case_id(prefix + "x")  # a folder name that cannot prefix a case id fails here
    seen: dict[str, Path] = {}  # merged case id -> its source
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for root, dataset, prefix in zip(roots, datasets, prefixes):
        for case in dataset.cases:
            if prefix + case in seen:
                raise ValueError(
                    f"case {prefix + case!r} would come from both {seen[prefix + case]} and {root}; "
                    "rename one of the source folders (later sources' ids are prefixed with their folder name)"
                )
            seen[prefix + case] = root
        if root in train_roots:
            splits["train"] += [prefix + c for c in dataset.cases]
            continue
        if not dataset.splits:
            raise ValueError(
                f"{root}: has no splits.json; write its splits first or merge it with train_only"
            )
        for split, cases in dataset.splits.items():
            splits.setdefault(split, []).extend(prefix + c for c in cases)
    licences = dict.fromkeys(str(d.meta["license"]) for d in datasets if d.meta.get("license"))
    out = Path(out)
    with atomic_folder(out) as tmp:
        DatasetWriter(
            tmp,
            name=name or "+".join(d.name for d in datasets),
            description="merged with lsms_core.data.merge.merge_datasets",
            license="; ".join(licences),
            provenance={
                "merged_from": [
                    {
                        "folder": str(root),
                        "case_prefix": prefix,
                        "train_only": root in train_roots,
                        "fingerprint": dataset.fingerprint(),
                        "dataset": dataset.meta,
                    }
                    for root, dataset, prefix in zip(roots, datasets, prefixes)
                ]
            },
        )
        records = []
        for root, dataset, prefix in zip(roots, datasets, prefixes):
            for case in dataset.cases:
                for path in (root / "cases" / case).rglob("*"):
                    if path.is_file():
                        _link_or_copy(
                            path, tmp / "cases" / (prefix + case) / path.relative_to(root / "cases" / case)
                        )
            for record in dataset.expressions():
                case, record = (
                    record["case"],
                    dict(record, id=prefix + record["id"], case=prefix + record["case"]),
                )
                if "mask" in record:
                    old = Path(record["mask"])
                    if old.parts[:2] == ("cases", case):  # inside its case folder: copied with it
                        new = Path("cases", record["case"], *old.parts[2:])
                    else:
                        new = Path("cases", record["case"], "masks", record["id"] + "".join(old.suffixes))
                        _link_or_copy(root / old, tmp / new)
                    record["mask"] = new.as_posix()
                records.append(record)
        writer = DatasetWriter(tmp, name="", exist_ok=True)  # reopened: it now lists the copied cases
        writer.add_expressions(records)
        writer.write_splits({split: sorted(cases) for split, cases in splits.items() if cases})
    return out
