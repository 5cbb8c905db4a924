"""`promptmad data synth`: generate the embedded default dataset.

Registration only builds argparse parsers; numpy, PIL and scikit-image are imported inside the
handler so that `promptmad --help` stays instant.
"""

from __future__ import annotations

import argparse

from promptmad.training.data.names import DEFAULT_CLASSES, DEFECTS, OBJECT_CLASSES, TEXTURE_CLASSES


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: "(default: None)" after a required or optional-list flag is noise."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def register_data(subparsers) -> None:
    """Add `promptmad data ...` (currently `data synth`) to the top-level sub-parsers."""
    p = subparsers.add_parser(
        "data",
        help="dataset tools (generate the embedded default dataset)",
        description="Dataset tools. Real datasets need no conversion: `promptmad train --data DIR` reads MVTec AD, "
                    "VisA (split_csv/1cls.csv) and plain <class>/good, <class>/bad, <class>/masks folders directly.",
    )
    sub = p.add_subparsers(dest="data_command", metavar="<data command>")
    s = sub.add_parser(
        "synth",
        help="generate the embedded default dataset (MVTec AD layout, no download)",
        description=(
            "Generate a small multi-class inspection dataset from photographs shipped with scikit-image: "
            f"textures {', '.join(TEXTURE_CLASSES)} and objects {', '.join(OBJECT_CLASSES)}. Normal images are varied "
            f"views (crop, shift, small rotation, lighting); defective test images carry one of {len(DEFECTS)} defect "
            f"kinds ({', '.join(DEFECTS)}) with an exact pixel mask. Written in MVTec AD's layout: "
            "OUT/<class>/train/good, OUT/<class>/test/<good|defect>, OUT/<class>/ground_truth/<defect>/<name>_mask.png, "
            "plus OUT/dataset.json and OUT/README.txt. The same --seed gives byte-identical files; the defaults take "
            "a few seconds on 2 CPU cores. Re-running into the same OUT replaces the dataset written there before; "
            "a folder holding other data is refused, never overwritten."
        ),
        epilog="example: promptmad data synth --out data/synth && promptmad train --data data/synth --out runs/default",
        formatter_class=_Formatter,
    )
    s.add_argument("--out", required=True, metavar="DIR", help="folder to write, e.g. data/synth (created if missing)")
    s.add_argument("--classes", nargs="+", choices=DEFAULT_CLASSES, metavar="CLASS",
                   help=f"generate only these classes, from: {' '.join(DEFAULT_CLASSES)} (default: all)")
    s.add_argument("--n-train", type=_positive, default=60, metavar="N", help="normal training images per class")
    s.add_argument("--n-test-good", type=_positive, default=15, metavar="N", help="normal test images per class")
    s.add_argument("--n-test-defect", type=_positive, default=25, metavar="N",
                   help="defective test images per class, spread over the defect kinds")
    s.add_argument("--image-size", type=int, default=256, metavar="PX",
                   help="side of the square images in pixels (64-2048; training resizes to its own size)")
    s.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files")
    s.set_defaults(func=_synth)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _synth(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from promptmad.training.data.synth import generate_dataset

    t0 = time.perf_counter()
    out = Path(args.out)
    classes = generate_dataset(out, classes=args.classes, n_train=args.n_train, n_test_good=args.n_test_good,
                               n_test_defect=args.n_test_defect, image_size=args.image_size, seed=args.seed)
    took = time.perf_counter() - t0
    doc = json.loads((out / "dataset.json").read_text())
    n_files = sum(1 for p in out.rglob("*.png"))
    print(f"wrote {out} in {took:.1f}s: {len(classes)} class{'es' if len(classes) > 1 else ''}, {args.image_size}x{args.image_size} px, seed {args.seed}, "
          f"{n_files} PNG files (MVTec AD layout)")
    for cls in classes:
        c = doc["classes"][cls]
        defects = ", ".join(f"{d} {n}" for d, n in c["test_defects"].items())
        print(f"  {cls:<7} ({c['kind']}): train/good {c['train_good']}, test/good {c['test_good']}, test defects: {defects}")
    print(f"next: promptmad train --data {out} --out runs/default")
    return 0
