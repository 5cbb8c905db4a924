"""`promptmad data synth`: generate the embedded default dataset."""

from __future__ import annotations

import argparse


def register_data(subparsers) -> None:
    p = subparsers.add_parser("data", help="dataset tools (generate the embedded default dataset)")
    sub = p.add_subparsers(dest="data_command", metavar="<data command>")
    s = sub.add_parser(
        "synth",
        help="generate the embedded default dataset in MVTec AD layout",
        description=(
            "Generate a small multi-class inspection dataset from images shipped with scikit-image "
            "(textures: brick, grass, gravel; objects: coffee, coins) with defects of five kinds "
            "(scratch, crack, stain, missing_piece, color_spot) and exact pixel masks, in MVTec AD's "
            "folder layout. Same --seed, same files."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--out", required=True, help="folder to write (e.g. data/synth)")
    s.add_argument("--classes", nargs="+", help="subset of brick coffee coins grass gravel (default: all)")
    s.add_argument("--n-train", type=int, default=60, help="normal training images per class")
    s.add_argument("--n-test-good", type=int, default=15, help="normal test images per class")
    s.add_argument("--n-test-defect", type=int, default=25, help="defective test images per class")
    s.add_argument("--image-size", type=int, default=256, help="side of the square images in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_synth)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _synth(args) -> int:
    import time

    from promptmad.training.data.synth import generate_dataset

    t0 = time.time()
    classes = generate_dataset(args.out, classes=args.classes, n_train=args.n_train, n_test_good=args.n_test_good,
                               n_test_defect=args.n_test_defect, image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.out}: classes {', '.join(classes)} ({args.n_train} train / {args.n_test_good} good + "
          f"{args.n_test_defect} defective test images each) in {time.time() - t0:.1f}s")
    return 0
