"""``prune-ofa recipes``: the shipped recipes, listed (``ls``) and copied for editing (``cp``), as
torchtune's ``tune ls`` and ``tune cp``.

The shipped recipes are the files under ``configs/``, found by walking it (a file added there is
listed): pre-training recipes at the top, ``finetune/`` (fine-tuning and QAT), ``pipelines/``
(``prune-ofa submit``), ``clusters/`` (cluster profiles) and any other folder. A recipe's name is its
path under ``configs/`` without ``.yaml`` (``bert-base-uncased-90``, ``finetune/squad-transfer``);
its description is the file's first comment line. ``cp`` takes a name, or a file name alone where
only one folder has it, and never overwrites.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
SUFFIX = ".yaml"
#: folder under configs/ -> (heading, how a copy is used); folders not here are listed under their name
KINDS = {
    "": ("pre-training recipes", "prune-ofa launch pretrain --config FILE"),
    "finetune": ("fine-tuning and QAT recipes", "prune-ofa launch finetune|qat --config FILE"),
    "pipelines": ("pipelines", "prune-ofa submit --pipeline FILE --dry-run"),
    "clusters": ("cluster profiles", "prune-ofa submit --pipeline P --cluster FILE"),
}


SUMMARY_CHARS = 100    # of a description in `recipes ls`
WRAPPED_LINE = 90      # a comment line at least this long may run on into the next
MIN_CLAUSE = 40        # a colon ends the description only after this many characters


@dataclass(frozen=True)
class ShippedRecipe:
    name: str            # path under configs/ without .yaml
    path: Path
    kind: str            # its folder under configs/ ("" at the top)
    description: str     # what the file's opening comment says first


def first_comment_line(path: Path) -> str:
    """What a file's opening comment says first: its first ``#`` line, with the next ones while a line
    runs on (header comments are prose wrapped near 100-120 columns, so a line may end mid-word), up to the
    end of the first sentence or clause outside parentheses (``. ``, ``; ``, or ``: `` after ``MIN_CLAUSE``), at most
    ``SUMMARY_CHARS`` cut at a word; "" where the file has no comment."""
    words: list[str] = []
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if not line.lstrip().startswith("#"):
                    if words:
                        break
                    continue
                words.append(line.strip().lstrip("#").strip())
                if len(line.rstrip()) < WRAPPED_LINE or re.search(r"[.:;]$", words[-1]):
                    break
    except (OSError, UnicodeDecodeError):
        return ""
    text = re.sub(r"-\s+(?=[a-z])", "-", " ".join(w for w in words if w))    # "(pattern- lock" -> "(pattern-lock"
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        ends = char in ".;" or (char == ":" and i >= MIN_CLAUSE)     # "Offline default: ..." goes on
        if depth == 0 and ends and (i + 1 == len(text) or text[i + 1] == " ") and text[i - 1:i] != ".":
            text = text[:i]
            break
    if len(text) > SUMMARY_CHARS:
        text = text[:SUMMARY_CHARS].rsplit(" ", 1)[0].rstrip(",( ") + " ..."
    return text.strip()


def shipped_recipes(root: Path = CONFIGS_DIR) -> list[ShippedRecipe]:
    """Every file under ``root`` (hidden files and folders aside), the known kinds first, by name."""
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or any(part.startswith((".", "__")) for part in relative.parts):
            continue
        name = relative.as_posix()
        name = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name
        kind = relative.parts[0] if len(relative.parts) > 1 else ""
        found.append(ShippedRecipe(name, path, kind, first_comment_line(path)))
    order = list(KINDS)
    return sorted(found, key=lambda r: (order.index(r.kind) if r.kind in order else len(order), r.kind, r.name))


def format_listing(recipes: list[ShippedRecipe]) -> str:
    """The recipes by kind, one line each: name and description."""
    width = max((len(r.name) for r in recipes), default=0)
    lines, kind = [], None
    for r in recipes:
        if r.kind != kind:
            kind = r.kind
            heading, usage = KINDS.get(kind, (kind, None))
            lines += ([""] if lines else []) + [f"{heading}" + (f" ({usage})" if usage else "") + ":"]
        lines.append(f"  {r.name:<{width}}  {r.description}".rstrip())
    lines += ["", "copy one to edit it: prune-ofa recipes cp NAME DEST"]
    return "\n".join(lines) + "\n"


def find_recipe(name: str, recipes: list[ShippedRecipe]) -> ShippedRecipe:
    """The recipe called ``name`` (with or without ``.yaml`` or ``configs/``; a file name alone where one
    folder has it); else a UserError listing the close names."""
    from sparse_pretrain.runtime.errors import UserError
    wanted = name.removeprefix("configs/").removesuffix(SUFFIX)
    by_name = {r.name: r for r in recipes}
    if wanted in by_name:
        return by_name[wanted]
    alone = [r for r in recipes if r.name.rsplit("/", 1)[-1] == wanted]
    if len(alone) == 1:
        return alone[0]
    if alone:
        raise UserError(f"{name!r} is in several folders: {', '.join(r.name for r in alone)}; "
                        f"give one of these names")
    short = {}                                   # file name alone -> the name (also matched)
    for r in recipes:
        short.setdefault(r.name.rsplit("/", 1)[-1], r.name)
    close = difflib.get_close_matches(wanted, [*by_name, *short], n=10, cutoff=0.6)
    close = list(dict.fromkeys(short.get(c, c) for c in close))[:5]
    hint = f"close: {', '.join(close)}" if close else "none is close"
    raise UserError(f"no shipped recipe {name!r} ({hint}; prune-ofa recipes ls lists them)")


def copy_recipe(recipe: ShippedRecipe, dest: str | Path) -> Path:
    """Copy a shipped recipe to ``dest`` (a file, or a folder that exists or ends with /: the recipe's
    file name inside it), byte for byte; a file already there is not overwritten (UserError)."""
    from sparse_pretrain.runtime.errors import UserError
    target = Path(dest)
    if target.is_dir() or str(dest).endswith(("/", "\\")):
        target = target / recipe.path.name
    data = recipe.path.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "xb") as out:        # exclusive: never replaces a file, even one made meanwhile
            out.write(data)
    except FileExistsError:
        raise UserError(f"{target} exists; not overwritten (give another path, or remove it)") from None
    return target


def cmd_recipes_ls(args) -> int:
    print(format_listing(shipped_recipes()), end="")
    return 0


def cmd_recipes_cp(args) -> int:
    recipe = find_recipe(args.name, shipped_recipes())
    target = copy_recipe(recipe, args.dest)
    usage = KINDS.get(recipe.kind, (None, None))[1]
    print(f"copied configs/{recipe.path.relative_to(CONFIGS_DIR).as_posix()} to {target}"
          + (f"; use it with: {usage.replace('FILE', str(target))}" if usage else ""))
    return 0


def add_recipes_command(subparsers) -> None:
    """Add ``recipes ls`` and ``recipes cp`` to an argparse subparsers object."""
    recipes = subparsers.add_parser(
        "recipes", help="list the shipped recipes (ls), or copy one to edit it (cp)",
        description="The recipes shipped in configs/: pre-training, fine-tuning and QAT recipes, pipelines and "
                    "cluster profiles. `ls` lists them with the first comment line of each; `cp NAME DEST` copies "
                    "one, so that you edit your own copy (an existing file is not overwritten).")
    which = recipes.add_subparsers(dest="recipes_command", metavar="ls|cp", required=True)
    ls = which.add_parser("ls", help="list the shipped recipes", description="List the recipes in configs/ "
                          "by kind: the name `cp` takes and the file's first comment line.")
    ls.set_defaults(func=cmd_recipes_ls)
    cp = which.add_parser("cp", help="copy a shipped recipe to a file of yours",
                          description="Copy a shipped recipe (its name from `prune-ofa recipes ls`, e.g. "
                                      "bert-base-uncased-90 or finetune/squad-transfer) to DEST, a file or a "
                                      "folder; an existing file is not overwritten.")
    cp.add_argument("name", metavar="NAME", help="the recipe's name (prune-ofa recipes ls)")
    cp.add_argument("dest", metavar="DEST", help="the file to write, or a folder to put it in")
    cp.set_defaults(func=cmd_recipes_cp)
