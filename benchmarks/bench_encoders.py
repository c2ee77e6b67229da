"""Encoder throughput: titles/s and images/s cold, and a warm re-run with 1% new articles.

Generates N synthetic headlines and N drawn ~128 px cover images in a temporary folder, runs
``encode_items`` with a fresh feature cache (cold: every article encoded; the time spent in
each tower gives titles/s and images/s), then again with ``--new-fraction`` of the articles
new (warm: only those encoded, the rest read from the cache), then once more with nothing new.

    .venv/bin/python benchmarks/bench_encoders.py --num-items 5000
    .venv/bin/python benchmarks/bench_encoders.py --num-items 5000 --abstract --out benchmarks/results/encoders_abstract.json

``--abstract`` gives every article a 25-45 word abstract and encodes "title. abstract" at 128
tokens, as the default config does; without it, titles alone at 48 tokens.

Prints the figures and writes them to benchmarks/results/encoders.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from recsys.columns import ABSTRACT, CATEGORY, CONTENT_HASH, IMAGE_OK, IMAGE_PATH, IMAGE_STATUS, NEWS_ID, TITLE

WORDS = {
    "sports": "team coach season playoff quarterback goal striker injury trade league title record fans win loss".split(),
    "finance": "stocks market fed rates inflation earnings bank shares investors recession dollar oil bonds profit".split(),
    "weather": "storm hurricane flood snow heat wave forecast rain tornado drought winds coast warning evacuation".split(),
    "food": "recipe dinner pasta chicken salad dessert chef restaurant kitchen easy healthy bake grill soup".split(),
    "tech": "phone app startup chip ai software update privacy hackers cloud robot launch data users".split(),
}
GLUE = "the a in after as of for with to on new says why how".split()


class Timed:
    """Wraps an encoder and accumulates the wall and CPU seconds spent in ``encode``.

    CPU seconds (all threads of this process) tell how much the figures suffer when other
    processes share the cores: wall / CPU well below the thread count means contention.
    """

    def __init__(self, encoder):
        self.encoder, self.info = encoder, encoder.info
        self.seconds = self.cpu_seconds = 0.0
        self.items = 0

    def encode(self, items, *args, **kwargs):
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            return self.encoder.encode(items, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu_start
            self.items += len(items)


def make_world(folder: Path, num_items: int, seed: int, start: int = 0, abstracts: bool = False) -> pd.DataFrame:
    """``num_items`` articles with headlines (and abstracts) and drawn JPEG covers (ids from ``start``)."""
    rng = np.random.default_rng(seed)
    categories = list(WORDS)
    rows = []
    for i in range(start, start + num_items):
        category = categories[rng.integers(len(categories))]
        words = [str(w) for w in rng.choice(WORDS[category] + GLUE, size=rng.integers(5, 14))]
        title = " ".join(words).capitalize()
        abstract = (" ".join(str(w) for w in rng.choice(WORDS[category] + GLUE, size=rng.integers(25, 46))).capitalize() + "."
                    if abstracts else None)
        cover = Image.new("RGB", (int(rng.integers(112, 160)), 128), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(cover)
        for _ in range(6):
            x, y = (int(v) for v in rng.integers(0, 110, 2))
            box = (x, y, x + int(rng.integers(10, 50)), y + int(rng.integers(10, 50)))
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)(box, fill=color)
        name = f"N{i}.jpg"
        cover.save(folder / name, quality=85)
        rows.append({NEWS_ID: f"N{i}", CATEGORY: category, TITLE: title, ABSTRACT: abstract,
                     IMAGE_PATH: name, IMAGE_STATUS: IMAGE_OK, CONTENT_HASH: f"h{i}"})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-items", type=int, default=500, help="articles in the cold run")
    parser.add_argument("--new-fraction", type=float, default=0.01, help="share of new articles in the warm run")
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow / onnxruntime threads")
    parser.add_argument("--batch-size", type=int, default=256, help="articles per encode_items step")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--abstract", action="store_true", help="encode title + abstract at 128 tokens (the default config)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encoders.json")
    args = parser.parse_args(argv)

    from recsys.encoders.cache import FeatureCache
    from recsys.encoders.image import ImageEncoder
    from recsys.encoders.pipeline import encode_items
    from recsys.encoders.text import TextEncoder
    from recsys.threads import configure_threads

    configure_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_encoders_") as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        num_new = max(1, round(args.num_items * args.new_fraction))
        news = make_world(images, args.num_items, args.seed, abstracts=args.abstract)
        extra = make_world(images, num_new, args.seed + 1, start=args.num_items, abstracts=args.abstract)

        start = time.perf_counter()
        text = Timed(TextEncoder(max_length=128 if args.abstract else 48, num_threads=args.threads))
        text_load_s = time.perf_counter() - start
        start = time.perf_counter()
        image = Timed(ImageEncoder(image_size=args.image_size, num_threads=args.threads))
        image_load_s = time.perf_counter() - start

        cache = FeatureCache(tmp / "features", text.info, image.info)
        start = time.perf_counter()
        cold = encode_items(news, images, text, image, cache, batch_size=args.batch_size, use_abstract=args.abstract)
        cold_s = time.perf_counter() - start
        text_s, image_s = text.seconds, image.seconds
        text_cpu_s, image_cpu_s = text.cpu_seconds, image.cpu_seconds
        if not cold.has_image.all():
            raise RuntimeError(f"{(~cold.has_image).sum()} generated covers failed to encode")

        grown = pd.concat([news, extra], ignore_index=True)
        text.items = image.items = 0
        start = time.perf_counter()
        encode_items(grown, images, text, image, FeatureCache(tmp / "features", text.info, image.info), batch_size=args.batch_size,
                     use_abstract=args.abstract)
        warm_s = time.perf_counter() - start
        warm_encoded = text.items

        text.items = 0
        start = time.perf_counter()
        encode_items(grown, images, text, image, FeatureCache(tmp / "features", text.info, image.info), batch_size=args.batch_size,
                     use_abstract=args.abstract)
        noop_s = time.perf_counter() - start
        cache_bytes = sum(p.stat().st_size for p in (tmp / "features").rglob("*") if p.is_file())

    results = {
        "num_items": args.num_items,
        "threads": args.threads,
        "image_size": args.image_size,
        "use_abstract": args.abstract,
        "text_encoder": text.info.to_dict(),
        "image_encoder": image.info.to_dict(),
        "text_model_load_s": round(text_load_s, 3),
        "image_model_load_s": round(image_load_s, 3),
        "text_titles_per_s": round(args.num_items / text_s, 1),  # articles/s: title + abstract with --abstract
        "images_per_s": round(args.num_items / image_s, 1),
        "text_cpu_s_per_1k_titles": round(1000 * text_cpu_s / args.num_items, 2),
        "image_cpu_s_per_1k_images": round(1000 * image_cpu_s / args.num_items, 2),
        "cold_encode_items_s": round(cold_s, 2),
        "warm_new_items": num_new,
        "warm_items_encoded": warm_encoded,
        "warm_rerun_s": round(warm_s, 3),
        "warm_nothing_new_s": round(noop_s, 3),
        "cache_bytes_per_item": round(cache_bytes / (args.num_items + num_new)),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "machine": platform.platform(),
    }
    for key, value in results.items():
        print(f"{key:>24}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"written to {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
