"""Config commands: ``configs`` lists the shipped run configs, ``config`` prints one resolved (or the schema).

Wherever a command takes a CONFIG, a shipped config's name (``quickstart``) stands
for its file (``configs/quickstart.yaml``); ``config_file`` is that argparse type.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from pipeline.config import RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
"""The shipped run configs (their task bases are in configs/tasks/)."""

CONFIG_HELP = "run config YAML, or the name of a shipped one (python -m pipeline configs lists them)"


def config_file(text: str) -> str:
    """An argparse type: ``text`` when it names a file, else the shipped config of that name when there is one,
    else ``text`` unchanged (reading it then fails naming the path)."""
    shipped = CONFIGS / f"{text}.yaml"
    return str(shipped) if not Path(text).exists() and shipped.is_file() else text


def shipped_configs() -> list[tuple[str, RunConfig]]:
    """Each shipped run config's name (its file's stem) and the config, validated, sorted by name."""
    return [(path.stem, load_config(path)) for path in sorted(CONFIGS.glob("*.yaml"))]


def _configs(args: argparse.Namespace) -> int:
    listed = shipped_configs()
    width = max(len(name) for name, _ in listed)
    for name, config in listed:
        print(f"{name:{width}s}  {config.description or ''}")
    print(f"\n{len(listed)} run configs in {CONFIGS} (task bases in {CONFIGS / 'tasks'}); "
          "use a name or a path wherever a command takes CONFIG, e.g. python -m pipeline config quickstart")
    return 0


def _add_configs(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("configs", help="list the shipped run configs with their descriptions")
    p.set_defaults(func=_configs)


def _config(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(RunConfig.model_json_schema(), indent=2))
        return 0
    if args.config is None:
        args.parser.error("give CONFIG, or --schema")
    config = load_config(args.config, args.set)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, width=1000), end="")
    return 0


def _add_config(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "config", help="print a run config fully resolved (bases, --set, defaults) as YAML, or the JSON schema"
    )
    p.add_argument("config", nargs="?", type=config_file, help=CONFIG_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. task.ways=20")
    p.add_argument("--schema", action="store_true", help="print the JSON schema of every run config instead")
    p.set_defaults(func=_config, parser=p)
