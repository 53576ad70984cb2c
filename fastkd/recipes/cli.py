"""Command line of the reference recipes: `fastkd-train l2d [options]` (also `python -m fastkd.recipes.cli`).
Multi-GPU: `torchrun --nproc_per_node=N -m fastkd.recipes.cli l2d ...`."""
import argparse
import sys
import time

from fastkd.recipes import distributed, l2d


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastkd-train", description=__doc__.splitlines()[0])
    recipes = parser.add_subparsers(dest="recipe", required=True)
    p = recipes.add_parser("l2d", help="L2D multi-label distillation (built-in digit canvases by default)")
    p.add_argument("--out-dir", help="where runs, checkpoints, metrics, table and plot go (runs/l2d)")
    p.add_argument("--dataset", choices=["digits", *l2d.REAL_SPLITS],
                   help="digits (built in, default) or a real dataset under --data-root")
    p.add_argument("--data-root", help="voc2007: the folder holding VOCdevkit; coco2014: the folder holding "
                   "annotations/ and train2014/ val2014/; image-list: the folder holding train.txt and test.txt")
    p.add_argument("--image-size", type=int, help="real datasets: square input side (224)")
    p.add_argument("--num-workers", type=int, help="real datasets: image-decoding workers per process (4)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", choices=["bf16", "fp16"], help="autocast the forward passes (GPU)")
    p.add_argument("--train-samples", type=int)
    p.add_argument("--test-samples", type=int)
    p.add_argument("--teacher-backbone", help="cnn-W1-W2-..., resnet18/34/50/101, mobilenet_v2")
    p.add_argument("--student-backbone")
    p.add_argument("--teacher-backbone-weights", help="local state_dict file for the teacher's backbone")
    p.add_argument("--student-backbone-weights", help="local state_dict file for the students' backbone")
    p.add_argument("--teacher-checkpoint", help="use this trained teacher (last.pt or state_dict) instead of training")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--student-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (Adam)")
    p.add_argument("--lr-schedule", choices=["onecycle", "constant"])
    p.add_argument("--lambda-mld", type=float)
    p.add_argument("--mld-temperature", type=float, help="MLD temperature (1 = official; loss scaled by T^2)")
    p.add_argument("--lambda-cd", type=float)
    p.add_argument("--lambda-id", type=float)
    p.add_argument("--led-warmup-epochs", type=int)
    p.add_argument("--mean-floor", type=float, help="floor on LED's normalising means (0 = official)")
    p.add_argument("--loss-impl", choices=["fastkd", "reference"], help="fastkd ops or the plain formulas")
    p.add_argument("--methods", help="comma-separated subset of " + ",".join(l2d.METHODS))
    p.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help="continue the runs checkpointed in --out-dir (the default)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if checkpoints exist in --out-dir")
    summary = recipes.add_parser("l2d-summary", help="mean ± std over several l2d runs (e.g. seeds)")
    summary.add_argument("run_dirs", nargs="+", help="--out-dir of each finished l2d run")
    args = vars(parser.parse_args(argv))
    if args.pop("recipe") == "l2d-summary":
        print(l2d.summarize(args["run_dirs"]))
        return 0
    if args.get("methods"):
        args["methods"] = tuple(args["methods"].split(","))
        unknown = set(args["methods"]) - set(l2d.METHODS)
        if unknown:
            parser.error(f"--methods: unknown {sorted(unknown)}; choose from {list(l2d.METHODS)}")
    cfg = l2d.config_with(**args)
    began = time.time()
    histories = l2d.run(cfg)
    if not distributed.finish():
        return 0
    print(f"\nL2D ablation ({cfg.dataset} test set; {time.time() - began:.0f} s):\n")
    print(l2d.results_table(histories))
    print(f"\ntable, JSON, plot, checkpoints and per-epoch metrics: {cfg.out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
