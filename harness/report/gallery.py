"""The image gallery: each row's fixed gallery images (from its lowest finished seed),
downloaded from MLflow and thumbnailed into ``<out>/gallery``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from harness.report.leaderboard import Leaderboard, _slug
from harness.report.store import fetch_gallery


def collect_gallery(board: Leaderboard, tracking_uri: str, out_dir: Path, max_side: int = 160) -> dict[tuple[str, str], dict]:
    """For each (suite, dataset): the fixed gallery images of every row, from each row's
    lowest finished seed, downloaded from MLflow, thumbnailed into ``out_dir/gallery``.

    -> {(suite, dataset): {"ids": [...], "rows": [{"label", "seed", "run_id",
    "images": {id: {kind: path}}}]}}; images that a run lacks are simply absent.
    """
    from PIL import Image

    from harness.visualize import voc_palette

    result: dict[tuple[str, str], dict] = {}
    if board.table.empty:
        return result
    finished = board.runs[board.runs["status"] == "finished"]
    palette = voc_palette()
    with tempfile.TemporaryDirectory() as tmp:
        for (suite, dataset), group in board.table.groupby(["suite", "dataset"], sort=True):
            entries = []
            for _, row in group.sort_values("label").iterrows():
                runs = finished[(finished["suite"] == suite) & (finished["dataset"] == dataset) & (finished["label"] == row["label"])]
                if runs.empty:
                    continue
                run = runs.sort_values("seed").iloc[0]
                found = fetch_gallery(tracking_uri, run["run_id"], Path(tmp) / run["run_id"])
                if not found:
                    continue
                target = out_dir / "gallery" / _slug(suite) / _slug(dataset) / _slug(row["label"])
                target.mkdir(parents=True, exist_ok=True)
                images: dict[str, dict[str, Path]] = {}
                for image_id, kinds in found.items():
                    for kind, path in kinds.items():
                        dst = target / f"{_slug(image_id)}_{kind}.png"
                        with Image.open(path) as im:
                            if im.mode == "P" or kind in ("gt", "mask", "pred"):
                                labels = np.array(im if im.mode in ("P", "L") else im.convert("L"))
                                im2 = Image.fromarray(palette[labels])
                                resample = Image.NEAREST
                            else:
                                im2 = im.convert("RGB")
                                resample = Image.BILINEAR
                            scale = max_side / max(im2.size)
                            if scale < 1:
                                im2 = im2.resize((max(1, round(im2.width * scale)), max(1, round(im2.height * scale))), resample)
                            im2.save(dst, optimize=True)
                        images.setdefault(image_id, {})[kind] = dst
                tag = row.get("tag")
                name = tag if isinstance(tag, str) and tag else row["label"]  # the short tag the tables show
                entries.append({"label": row["label"], "name": name, "seed": int(run["seed"]), "run_id": run["run_id"], "images": images})
            if entries:
                ids = sorted(set().union(*(e["images"].keys() for e in entries)))
                common = [i for i in ids if all(i in e["images"] for e in entries)]
                result[(suite, dataset)] = {"ids": common or ids, "rows": entries}
    return result
