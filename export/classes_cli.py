"""CLI of `promptmad classes add | remove | list | reload` (export/classes.py does the work)."""

from __future__ import annotations

import argparse

from promptmad import contract
from promptmad.export.live_reload import DEFAULT_GRPC_PORT
from promptmad.training.onboard_images import AUGMENTS, DEFAULT_AUGMENT, ONBOARD_FUSION_WEIGHT, ONBOARD_FUSION_WEIGHT_PROFILED

DESCRIPTION = (
    "Add a product class to an exported repository without retraining, or retire one. `add` computes the class's "
    "prompts with the trained run the repository was exported from (its CLIP text tower and prompt ensemble, its "
    "encoder and reconstructor) from a few normal images, and its threshold; `remove` stops serving a class. Each "
    "writes a new version of prompt_bank and the class list of the configs, atomically (the repository at its path "
    "always verifies), and keeps every other class's rows bit-identical. Class ids never change: a removed id is "
    "never reused. With --server, a server started with `promptmad serve --model-control-mode explicit` loads the "
    "change while it serves (no restart, no failed request), using its admin key "
    f"(${contract.ADMIN_KEY_ENV} or the key file `promptmad serve` wrote)."
)
SHOTS_HELP = (
    "use the first K images of --images, by file name (default: all, at most 64). The FIRST image is the class's "
    "normal-image prompt (training prompts a class with one image); all K form its bank of normal patches, so more "
    "images mean fewer false alarms on ordinary variation (measured on the embedded data, image AUROC against the "
    "same class trained on: 4.3 points under with 4 images, 2.5 with 8; README, onboarding)"
)
HELD_OUT_HELP = (
    "folder of other normal images of the product, for the units and the threshold (as training calibrates). "
    "Without it: leave-one-out over the K images (each against a bank of the others; a loose threshold, with a "
    "warning), and with K = 1 the image itself (nearly every frame of the class will be flagged; a loud warning)"
)


def register(subparsers) -> None:
    p = subparsers.add_parser("classes", help="add / remove / list product classes of a repository, live on a running server",
                              description=DESCRIPTION)
    sub = p.add_subparsers(dest="classes_command", metavar="<add|remove|list|reload>", required=True)
    _register_add(sub)
    _register_remove(sub)
    _register_list(sub)
    _register_reload(sub)


def _command(sub, name: str, summary: str) -> argparse.ArgumentParser:
    c = sub.add_parser(name, help=summary, description=summary)
    c.add_argument("--repo", default="model_repository", help="exported model repository (default: model_repository)")
    return c


def _server_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--server", help="HTTP address of a server serving --repo in explicit model control mode, e.g. "
                   "http://127.0.0.1:8000 (loopback only); it loads the change at once")
    _key_and_port(c)


def _key_and_port(c: argparse.ArgumentParser) -> None:
    c.add_argument("--admin-key-file", help=f"file holding the server's admin key (default: ${contract.ADMIN_KEY_ENV}, else "
                   "the file `promptmad serve` wrote for that HTTP port)")
    c.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="the server's gRPC port, on the host of --server: "
                   f"the loads go there (over HTTP they would hold up HTTP inference while they run) (default: {DEFAULT_GRPC_PORT})")


def _register_add(sub) -> None:
    a = _command(sub, "add", "onboard a product class from a few normal images (no retraining)")
    a.add_argument("--name", required=True, help="class name: letters, digits, '_', '-', '.'")
    a.add_argument("--images", required=True, help="folder of normal (defect-free) images of the product; any size, "
                   "resized as training and serving resize frames")
    a.add_argument("--shots", type=int, metavar="K", help=SHOTS_HELP)
    a.add_argument("--held-out", metavar="DIR", help=HELD_OUT_HELP)
    a.add_argument("--augment", choices=list(AUGMENTS), default=DEFAULT_AUGMENT,
                   help="views of each image whose patches also feed the class's normal bank (a fuller bank from few "
                        "images): 'shifts' (moved by half a patch in the 8 directions: a product that sits a few pixels off), 'flips' (its 3 "
                        "mirror images), 'texture' (all 8 rotations and mirror images: a texture with no up or side), 'none' (a product whose moved or mirrored image is itself a defect) "
                        f"(default: {DEFAULT_AUGMENT})")
    a.add_argument("--fusion-weight", type=float, metavar="W",
                   help="the segmentor's weight in the class's map, deviation + W x segmentor probability (default: "
                        f"{ONBOARD_FUSION_WEIGHT_PROFILED:g}, {ONBOARD_FUSION_WEIGHT:g} for a run without position gains, or the "
                        "run's if lower, the run's with one image and no --held-out: "
                        "a segmentor that never saw the product fires on its normal images too; measured in README)")
    a.add_argument("--run", help="the trained run the repository was exported from (default: the manifest's `checkpoint`)")
    a.add_argument("--clip-weights", help="the CLIP weights the run was trained with, if they moved (default: the run's)")
    a.add_argument("--prompt", metavar="WORDS", help="words describing the product for its text prompts, used in place "
                   "of the name (e.g. 'blue bottle cap')")
    a.add_argument("--defect", action="append", default=[], metavar="WORD",
                   help="a defect word for its anomalous prompts ('scratch' -> 'a photo of the <product> with a scratch'); repeatable")
    _server_arguments(a)
    a.set_defaults(func=_add)


def _register_remove(sub) -> None:
    r = _command(sub, "remove", "stop serving a class (its id is never reused; clients get UnknownClass)")
    r.add_argument("--name", required=True)
    _server_arguments(r)
    r.set_defaults(func=_remove)


def _register_list(sub) -> None:
    ls = _command(sub, "list", "ids, names and thresholds of the repository's classes (removed ones marked)")
    ls.add_argument("--server", help="also show what the server at this HTTP address serves, e.g. http://127.0.0.1:8000")
    ls.set_defaults(func=_list)


def _register_reload(sub) -> None:
    r = _command(sub, "reload", "make a running server (explicit model control) load the repository's current classes")
    r.add_argument("--server", required=True, help="HTTP address, e.g. http://127.0.0.1:8000 (loopback only)")
    _key_and_port(r)
    r.set_defaults(func=_reload)


def _next_step(args) -> str:
    return ("the running server (if any) still serves the previous classes: load the change with\n"
            f"  promptmad classes reload --repo {args.repo} --server http://127.0.0.1:8000\n"
            "(a server started with `promptmad serve --model-control-mode explicit`), or restart `promptmad serve`")


def _add(args) -> int:
    from promptmad.export.classes import AddClass, add_class

    cfg = AddClass(repo=args.repo, name=args.name, images=args.images, shots=args.shots, held_out=args.held_out, run=args.run,
                   augment=args.augment, fusion_weight=args.fusion_weight,
                   server=args.server, clip_weights=args.clip_weights, prompt=args.prompt, defects=tuple(args.defect),
                   admin_key_file=args.admin_key_file, grpc_port=args.grpc_port)
    done = add_class(cfg)
    print(f"added class {done.name!r} as id {done.class_id} (prompt_bank version {done.version}), threshold "
          f"{done.threshold:.3f} ({done.calibration}), in {done.seconds:.1f} s")
    print(f"served by {args.server} (loaded in {done.reload_seconds:.1f} s)" if args.server else _next_step(args))
    return 0


def _remove(args) -> int:
    from promptmad.export.classes import RemoveClass, remove_class

    done = remove_class(RemoveClass(repo=args.repo, name=args.name, server=args.server, admin_key_file=args.admin_key_file,
                                    grpc_port=args.grpc_port))
    print(f"removed class {done.name!r} (id {done.class_id} stays taken; prompt_bank version {done.version}) in {done.seconds:.1f} s")
    print(f"served by {args.server} (loaded in {done.reload_seconds:.1f} s)" if args.server else _next_step(args))
    return 0


def _list(args) -> int:
    from promptmad.export.classes import list_classes, server_view
    from promptmad.export.manifest import verify_repository_checksums

    doc = verify_repository_checksums(args.repo)
    print(f"{'id':>4}  {'name':<24} {'threshold':>9}  state")
    for e in list_classes(args.repo):
        thr = "" if e.threshold is None else f"{e.threshold:9.3f}"
        print(f"{e.class_id:>4}  {e.name:<24} {thr:>9}  {'removed' if e.removed else 'served'}")
    if args.server:
        names, digest = server_view(args.server)
        same = digest == doc["manifest_sha256"]
        live = ", ".join(n for n in names if n != contract.REMOVED_CLASS)
        print(f"server {args.server}: {'serves this repository as it is' if same else 'serves ANOTHER version (reload it)'}; "
              f"classes: {live}")
    return 0


def _reload(args) -> int:
    from promptmad.export.classes import reload_server

    seconds = reload_server(args.repo, args.server, args.admin_key_file, args.grpc_port)
    print(f"{args.server} loaded {args.repo}'s classes in {seconds:.1f} s")
    return 0
