"""How well faces and OCR find what the demo generator planted (run after `dvc repro`).

    python benchmarks/demo_detection.py [--data data]

Faces: share of posters with planted faces where MTCNN finds exactly that many (and at least one),
false detections on posters without planted faces, and the share of pasted face photos with a detection
centred inside them. OCR: share of posters with a planted word where a kept box reads it exactly.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pyarrow.parquet as pq


def centre_inside(det: list[float], pasted: list[float]) -> bool:
    """A detection belongs to a pasted face photo when its centre lies inside the pasted rectangle
    (the pasted photo includes hair and background, so IoU with the tight face box is low)."""
    cx, cy = (det[0] + det[2]) / 2, (det[1] + det[3]) / 2
    return pasted[0] <= cx <= pasted[2] and pasted[1] <= cy <= pasted[3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data")
    args = ap.parse_args()
    data = Path(args.data)
    planted = {r["id"]: r for r in csv.DictReader((data / "demo/raw/planted_items.csv").open(encoding="utf-8"))}
    faces = {r["id"]: r["elements"] for r in pq.read_table(data / "features/faces/features.parquet").to_pylist()}
    ocr = {r["id"]: r["elements"] for r in pq.read_table(data / "features/ocr/features.parquet").to_pylist()}

    with_faces = [i for i, p in planted.items() if int(p["faces"]) > 0]
    without = [i for i, p in planted.items() if int(p["faces"]) == 0]
    found_any = sum(1 for i in with_faces if faces[i])
    exact = sum(1 for i in with_faces if len(faces[i]) == int(planted[i]["faces"]))
    boxes = [(b, [e["box"] for e in faces[i]]) for i in with_faces for b in json.loads(planted[i]["face_boxes"])]
    matched = sum(1 for b, det in boxes if any(centre_inside(d, b) for d in det))
    false_items = sum(1 for i in without if faces[i])
    extra = sum(max(0, len(faces[i]) - int(planted[i]["faces"])) for i in planted)

    with_word = [i for i, p in planted.items() if p["word"]]
    read = sum(1 for i in with_word if any(e["text"] == planted[i]["word"] for e in ocr[i]))
    read_ci = sum(1 for i in with_word if any(planted[i]["word"] in e["text"].upper() for e in ocr[i]))
    no_word_boxes = sum(1 for i, p in planted.items() if not p["word"] and ocr[i])
    fear = [i for i in with_word if planted[i]["word"] == "FEAR"]
    fear_read = sum(1 for i in fear if any(e["text"] == "FEAR" for e in ocr[i]))

    report = {
        "posters": len(planted),
        "faces": {
            "posters_with_planted_faces": len(with_faces),
            "found_at_least_one": round(found_any / len(with_faces), 4),
            "found_exact_count": round(exact / len(with_faces), 4),
            "pasted_faces_with_a_detection_inside": round(matched / len(boxes), 4),
            "posters_without_faces": len(without),
            "posters_without_faces_with_detections": false_items,
            "extra_detections_total": extra,
        },
        "ocr": {
            "posters_with_planted_word": len(with_word),
            "word_read_exactly": round(read / len(with_word), 4),
            "word_read_case_insensitive_substring": round(read_ci / len(with_word), 4),
            "planted_FEAR_read_exactly": f"{fear_read}/{len(fear)}",
            "posters_without_word_with_boxes": no_word_boxes,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
