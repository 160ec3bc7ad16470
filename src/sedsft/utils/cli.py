"""The command line checked before Hydra starts a run.

Hydra reports a misspelt knob with advice that is wrong here (``+loss.lamda=0.5`` adds a key
that the loss then refuses), puts its search path under an unknown option, and a missing
required value (``ckpt=``) only fails deep inside the run, after the run directory exists.
:func:`preflight` composes the config as Hydra will, before anything is written, and turns
each of these into one message: what is wrong, the closest valid name, and on its last line
what to type. Exit status 2, no traceback, nothing on disk.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"
USAGE_ERROR = 2  # the exit status of a command-line mistake (as argparse)

# Any Hydra flag (-m sweeps, --cfg, --help, -cn ...) leaves the command line to Hydra.
_HYDRA_FLAGS = ("-",)


class CommandLineError(SystemExit):
    """A mistake on the command line: printed as it is, exit status 2."""

    def __init__(self, lines: Sequence[str]):
        print("\n".join(lines), file=sys.stderr)
        super().__init__(USAGE_ERROR)


def _closest(word: str, choices: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def _compose(config_name: str, overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def _group_options(group: str) -> list[str]:
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _unknown_key(config_name: str, overrides: list[str], bad: str, full_key: str) -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    parent, _, key = full_key.rpartition(".")
    try:  # the same command line without the mistake: what the node does hold
        node = OmegaConf.select(_compose(config_name, [o for o in overrides if o != bad]), parent) if parent else None
    except Exception:
        node = None
    keys = sorted(str(k) for k in node if not str(k).startswith("_")) if isinstance(node, DictConfig) else []
    where = f"the {parent} config" if parent else "the config"
    if isinstance(node, DictConfig) and isinstance(node.get("name"), str):
        where = f"{parent} {node.get('name')!r}"  # e.g. loss 'sed'
    guess = _closest(key, keys)
    value = bad.split("=", 1)[1] if "=" in bad else ""
    prefix = f"{parent}." if parent else ""
    lines = [f"{bad}: {where} has no knob {key!r}."]
    if keys:
        lines.append(f"Its knobs: {', '.join(keys)}.")
    lines.append(f"Did you mean: {prefix}{guess}={value}" if guess else f"Use one of its knobs: {prefix}<knob>={value}")
    return lines


def _missing_option(message: str, overrides: list[str]) -> list[str] | None:
    # Hydra: "In 'train': Could not find 'loss/sedd'" (or "Could not load 'loss/sedd'")
    import re

    match = re.search(r"Could not (?:find|load) '([\w/.-]+)/([\w.-]+)'", message)
    if not match:
        return None
    group, option = match.group(1), match.group(2)
    options = _group_options(group)
    guess = _closest(option, options)
    typed = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == group.replace("/", ".")), f"{group}={option}")
    lines = [f"{typed}: there is no configs/{group}/{option}.yaml."]
    if options:
        lines.append(f"Options of {group}: {', '.join(options)}.")
    lines.append(f"Did you mean: {group}={guess}" if guess else f"Choose one of the options above: {group}=<option>")
    return lines


def preflight(
    config_name: str,
    required: Mapping[str, tuple[Callable[[object], bool], str, str]] | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """Compose ``configs/<config_name>`` with this command line's overrides as Hydra will and
    raise :class:`CommandLineError` (exit 2) for an unknown knob, an unknown config option, or
    a missing required value.

    ``required`` maps a knob to ``(is_missing(cfg) -> bool, what it is, an example command)``. Command lines
    with Hydra flags (``-m``, ``--cfg``, ``--help``, ...) are left to Hydra: a sweep composes
    each job itself.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith(_HYDRA_FLAGS) for a in argv):
        return
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigKeyError

    try:
        cfg = _compose(config_name, argv)
    except MissingConfigException as err:
        lines = _missing_option(str(err), argv)
        if lines:
            raise CommandLineError(lines) from None
        return
    except ConfigCompositionException as err:
        cause = err.__cause__
        text = str(err)
        if isinstance(cause, ConfigKeyError) or "not in struct" in str(cause):
            full_key = getattr(cause, "full_key", None)
            bad = next((o for o in argv if o.lstrip("+~").split("=", 1)[0] == full_key), None)
            if full_key and bad:
                raise CommandLineError(_unknown_key(config_name, argv, bad, full_key)) from None
        lines = _missing_option(text, argv)
        if lines:
            raise CommandLineError(lines) from None
        return  # anything else: Hydra reports it
    except Exception:
        return
    for name, (is_missing, what, example) in (required or {}).items():
        if is_missing(cfg):
            raise CommandLineError([f"{name}= is missing: {what}.", f"For example: {example}"])
