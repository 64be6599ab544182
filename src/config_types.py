"""Keys and value types of config nodes, checked against what the code they configure accepts.

Every node with a `_target_` (alg, aggregator, attack, partitioner, optim, model, data.loader,
model.tokenizer, ...) is compared with the signature of its target: a key the target does not take
and a value of the wrong type stop the run with one line naming the key, the value and what is
allowed. Annotations this module cannot judge (Any, classes, callables) are not checked.
"""

from __future__ import annotations

import inspect
import pydoc
import types
import typing
from collections.abc import Mapping, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from src.errors import ConfigError

# Configured by Hydra or Lightning (checked by them), not by us.
NOT_OURS = ("hydra", "trainer")
# Keys that our code reads and removes before it instantiates the node.
READ_BY_US = {
    "model": ("lora",),  # the model's LoRA defaults, read by the LoRA algorithms
    "logger": ("name",),  # the option's name (src/loggers.py), not an argument
}
# What each annotation allows, for the messages.
NAMES = {bool: "true or false (bool)", int: "an integer (int)", float: "a number (float)"}
NAMES |= {str: "a string", type(None): "null"}


def show(value) -> str:
    """A config value as the user typed it."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def allowed(value, hint) -> str | None:
    """None when `value` fits the annotation `hint` (or `hint` cannot be judged), else what fits."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        args = tuple(a for a in args if not (isinstance(a, type) and issubclass(a, torch.Tensor)))
        if len(args) == 1:
            return allowed(value, args[0])
        verdicts = [allowed(value, a) for a in args]
        return None if None in verdicts else " or ".join(verdicts)  # None: fits, or not judged
    if origin is typing.Literal:
        return None if value in args else "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, Sequence) or hint in (list, tuple, Sequence):
        if not isinstance(value, list | tuple | ListConfig):
            return "a list"
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                return f"a list of {len(args)} items"
            pairs = zip(items, args, strict=True)
        else:
            pairs = ((item, args[0]) for item in items) if args else ()
        wrong = next((what for item, a in pairs if (what := allowed(item, a))), None)
        return None if wrong is None else f"a list (each item {wrong})"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return None if isinstance(value, dict | DictConfig) else "a mapping"
    if hint in (int, bool):  # bool is no int here, and 2.0 is no int
        return None if type(value) is hint else NAMES[hint]
    if hint is float:
        return (
            None if isinstance(value, int | float) and not isinstance(value, bool) else NAMES[hint]
        )
    if hint in (str, type(None)):
        return None if isinstance(value, hint) else NAMES[hint]
    return None  # an annotation we do not judge


def check_value(key: str, value, hint) -> None:
    what = allowed(value, hint)
    if what is not None:
        raise ConfigError(f"{key}={show(value)} must be {what}")


def accepted(target) -> tuple[dict[str, inspect.Parameter], dict, bool]:
    """(parameters a config may set, by name; their annotations; whether any other keyword is
    taken too) of a function, or of a class's __init__ and the base-class __init__s that its
    **kwargs reach. Keyword-only parameters are the building code's (e.g. a logger's run)."""
    chain = [target]
    if inspect.isclass(target):
        chain = [vars(c)["__init__"] for c in target.__mro__[:-1] if "__init__" in vars(c)]
    params, hints = {}, {}
    for function in chain:
        try:
            hints = typing.get_type_hints(function) | hints  # the subclass's annotation wins
        except NameError:  # names imported for type checkers only: those are not judged
            pass
        signature = inspect.signature(function).parameters.values()
        for p in signature:
            # keyword-only parameters are given by the code that builds the node, not by config
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY):
                params.setdefault(p.name, p)
        if all(p.kind is not p.VAR_KEYWORD for p in signature):
            return params, hints, False
    return params, hints, True


def target_nodes(node: DictConfig, path: str = ""):
    """(dotted path, node) of every node with a `_target_` under `node` (not via interpolations)."""
    for key in node:
        if (not path and key in NOT_OURS) or OmegaConf.is_interpolation(node, key):
            continue
        child = None if OmegaConf.is_missing(node, key) else node[key]
        if isinstance(child, DictConfig):
            if "_target_" in child:
                yield f"{path}{key}", child
            yield from target_nodes(child, f"{path}{key}.")


def option(cfg: DictConfig, group: str) -> str:
    """`group=option` as on the command line (a node without `name`: its target's class name)."""
    node = cfg[group]
    return f"{group}={node.get('name') or str(node._target_).rsplit('.', 1)[-1].lower()}"


def check_targets(cfg: DictConfig) -> None:
    """Every key of every node with a `_target_`: one the target takes, with a value it accepts."""
    for path, node in target_nodes(cfg):
        target = pydoc.locate(node._target_)
        if target is None:
            raise ConfigError(f"{path}._target_={node._target_!r} cannot be imported")
        params, hints, takes_any = accepted(target)
        partial = node.get("_partial_", False)  # then required arguments come with the call
        for key in node:
            if key.startswith("_") or key in READ_BY_US.get(path, ()):
                continue
            if key not in params and not takes_any:
                keys = [
                    k
                    for k, p in params.items()
                    if k in node or not partial or p.default is not p.empty
                ]
                raise ConfigError(
                    f"{path}.{key} is not an option of {option(cfg, path.split('.')[0])}; "
                    + (f"its keys are: {', '.join(keys)}" if keys else "it takes no keys")
                )
            if OmegaConf.is_missing(node, key):
                raise ConfigError(f"{path}.{key} has no value (???); set it")
            if key in hints:
                check_value(f"{path}.{key}", node[key], hints[key])
