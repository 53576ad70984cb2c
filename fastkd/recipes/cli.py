"""Command line of the reference recipes: `fastkd-train RECIPE [options]` (also `python -m fastkd.recipes.cli`),
and `fastkd-train RECIPE-summary DIR...` over finished runs. Multi-GPU: `torchrun --nproc_per_node=N -m
fastkd.recipes.cli RECIPE ...`. Every recipe's options come from its config dataclass; a run's config is, lowest
priority first: the defaults, --preset NAME, --config FILE (YAML, TOML or JSON), then the flags."""
import argparse
import sys
import time

from fastkd.recipes import config, distributed, l2d, lgd, mltr, report, tat, tat_seg
from fastkd.recipes.checkpoints import CheckpointError
from fastkd.recipes.config import ConfigError
from fastkd.recipes.engine import NonFiniteLossError

RECIPES = {recipe.name: recipe for recipe in (l2d.RECIPE, lgd.RECIPE, mltr.RECIPE, tat.RECIPE, tat_seg.RECIPE)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd-train", description="Reference training recipes of fastkd.")
    commands = parser.add_subparsers(dest="command", required=True)
    for recipe in RECIPES.values():
        sub = commands.add_parser(recipe.name, help=recipe.help, description=recipe.help)
        sub.add_argument("--preset", choices=list(recipe.presets), help="named settings to start from")
        sub.add_argument("--config", metavar="FILE", help="options from a YAML, TOML or JSON file (flags win)")
        config.add_arguments(sub, recipe.config)
        summary = commands.add_parser(f"{recipe.name}-summary", help=f"mean ± std over several {recipe.name} runs")
        summary.add_argument("run_dirs", nargs="+", help=f"--out-dir of each finished {recipe.name} run")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    name = args.command.removesuffix("-summary")
    recipe = RECIPES[name]
    if args.command.endswith("-summary"):
        try:
            print(report.summarize(args.run_dirs, recipe.metric))
        except (OSError, ValueError, KeyError) as error:
            _fail(args.command, error, 2)
        return 0
    try:
        presets = [recipe.presets[args.preset]] if args.preset else []
        files = [config.read_file(args.config)] if args.config else []
        cfg = config.resolve(recipe.config, *presets, *files, config.given(args, recipe.config))
        began = time.time()
        histories = recipe.run(cfg)
    except (ConfigError, CheckpointError, NonFiniteLossError) as error:
        distributed.finish()
        _fail(args.command, error, 1 if isinstance(error, NonFiniteLossError) else 2)
    if not distributed.finish():
        return 0
    print(f"\n{recipe.title.format(**vars(cfg))} ({time.time() - began:.0f} s):\n")
    print(recipe.table(histories))
    print(f"\ntable, JSON, plot, checkpoints and per-epoch metrics: {cfg.out_dir}/")
    return 0


def _fail(command: str, error: Exception, code: int):
    """One line on stderr naming the problem (no traceback), then exit with `code`."""
    print(f"fastkd-train {command}: error: {error}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
